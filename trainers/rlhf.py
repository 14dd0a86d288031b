"""RLHF: REINFORCE with a leave-one-out baseline (RLOO) and a KL penalty, one program, one mesh.

  python -m trainers.rlhf --config configs/rlhf_tiny.py --workdir /tmp/rlhf_tiny    # CPU demo
  python -m trainers.rlhf --config configs/rlhf_gemma_2b.py --workdir DIR --distributed \
      --config.init_from=SFT_DIR --config.rlhf.reward_model=REWARD_WORKDIR ...

Each step (the rollout hook's before_step, then the ordinary jitted train step):
  1. rollout: k completions per prompt of the batch from the current policy with the project
     sampler (same params, same mesh), seeded by (state rng, step) so a resumed run samples
     the same completions;
  2. score: rlhf.reward_fn ("module:function(prompts, completions, **fields)") or the reward
     model of a reward-trainer workdir (rlhf.reward_model);
  3. teacher-forced forward passes of the policy and the frozen reference at temperature 1
     give the token log-probs for the KL (and the entropy); R = r - beta * KL; RLOO
     advantages (gemma_jax/rl.py);
  4. the train step minimises -mean_i A_i * sum_t log pi(y_i,t) (rl.rloo_loss).
With rlhf.algorithm="grpo" (gemma_jax/grpo.py) the advantages are group-normalised, the loss
is the clipped ratio against the behaviour policy (+ beta k3 with rlhf.kl="loss"), and a
rollout feeds updates_per_rollout x minibatches steps (trainers/rollout_cycle.py).
The reference is the policy the run started from (config.init_from, else the seeded random
init; with LoRA the initial adapters, which add exactly nothing, on the shared frozen base),
rebuilt the same way on resume. Metrics: reward mean/std, KL, completion length,
fraction truncated, entropy, rollout and learner tokens/s; a few completions per log step go
to the console and WORKDIR/rollouts.jsonl.

Several hosts: each samples and scores the completions of its own prompt rows (the data
iterator gives each host its share) with the policy on the global mesh; the k completions
of a prompt stay on its host (for the leave-one-out baseline), and the learner batch and the
scores become global arrays built from every host's rows. The seeds depend on (state rng,
step, global row) only, so 2 hosts x 4 devices sample what 1 x 8 does.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs.base import ConfigError, model_config
from gemma_jax import checkpoint, distributed, grpo, rl, sharding
from gemma_jax.model_dir import load_reward_model
from gemma_jax.reward_model import sequence_rewards
from gemma_jax.sampler import Completion, Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train_step import BATCH_KEYS, LossFn
from trainers import cli, hooks, loop, rollout_cycle
from trainers.reference import Reference

ROLLOUTS_FILE = "rollouts.jsonl"  # a few completions per log step (not config.samples)


def make_loss(config: ml_collections.ConfigDict) -> LossFn:
  check_config(config)
  r, chunk = config.rlhf, config.train.loss_chunk_size
  if r.algorithm == "rloo":
    return functools.partial(rl.rloo_loss, chunk_size=chunk)
  return functools.partial(grpo.grpo_loss, clip_eps=float(r.clip_eps) or None,
                           beta=float(r.beta) if r.kl == "loss" else 0.0,
                           normalisation=r.normalisation, chunk_size=chunk)


def cycle_length(r: ml_collections.ConfigDict) -> int:
  """Loop steps per rollout (trainers/rollout_cycle.py): 1 for RLOO."""
  return r.updates_per_rollout * r.minibatches


def check_config(config: ml_collections.ConfigDict) -> None:
  """What configs.base cannot check without knowing the job is RLHF."""
  r, cfg = config.rlhf, model_config(config)
  if bool(r.reward_fn) == bool(r.reward_model):
    raise ConfigError("config.rlhf: set exactly one of reward_fn ('module:function') or "
                      "reward_model (a reward-trainer workdir)")
  if r.reward_fn:
    load_reward_fn(r.reward_fn)
  if r.reward_model and not (Path(r.reward_model) / checkpoint.CONFIG_FILE).is_file():
    raise ConfigError(f"config.rlhf.reward_model={r.reward_model!r} is not a reward-trainer "
                      "workdir (no config.json)")
  _check_algorithm(config)
  if config.eval.every:
    raise ConfigError(f"config.eval.every={config.eval.every}: RLHF has no held-out loss; "
                      "set it to 0 (the reward curve is in metrics.jsonl)")
  if config.train.seq_len + r.max_new_tokens > cfg.max_seq_len:
    raise ConfigError(f"config.train.seq_len={config.train.seq_len} (the prompt buffer) + "
                      f"config.rlhf.max_new_tokens={r.max_new_tokens} exceed the model's "
                      f"max_seq_len={cfg.max_seq_len}")


def _check_algorithm(config: ml_collections.ConfigDict) -> None:
  """rlhf.algorithm and GRPO's keys; a cycle's minibatches must split over the mesh."""
  r = config.rlhf
  choices = {"algorithm": rl.ALGORITHMS, "kl": grpo.KL_MODES,
             "normalisation": grpo.NORMALISATIONS}
  for key, allowed in choices.items():
    if r[key] not in allowed:
      raise ConfigError(f"config.rlhf.{key}={r[key]!r}; choose one of {allowed}")
  if r.updates_per_rollout < 1 or r.minibatches < 1 or r.clip_eps < 0:
    raise ConfigError("config.rlhf: updates_per_rollout and minibatches must be >= 1 and "
                      "clip_eps >= 0")
  if r.algorithm == "rloo" and (cycle_length(r) > 1 or r.kl != "reward"):
    raise ConfigError("config.rlhf.algorithm='rloo' takes one update per rollout "
                      "(updates_per_rollout=minibatches=1) and kl='reward'; use 'grpo'")
  rows, shards = config.data.batch_size * r.k, config.train.microbatches * math.prod(
      sharding.mesh_shape(config.mesh, jax.device_count(), "config.mesh")[:2])
  if rows % (r.minibatches * shards):
    raise ConfigError(f"config.rlhf.minibatches={r.minibatches}: a rollout's {rows} rows "
                      f"must split into minibatches of a multiple of {shards} rows (batch "
                      "shards x train.microbatches)")
  cycle = cycle_length(r)
  for key in ("train.steps", "checkpoint.every"):
    section, name = key.split(".")
    if config[section][name] % cycle:
      raise ConfigError(f"config.{key}={config[section][name]} must be a multiple of the "
                        f"{cycle} steps of a rollout cycle (updates_per_rollout x "
                        "minibatches): checkpoints are taken between cycles")


def load_reward_fn(spec: str) -> Callable:
  module, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.rlhf.reward_fn={spec!r}: {e}") from e
  if not callable(fn):
    raise ConfigError(f"config.rlhf.reward_fn={spec!r} is not callable")
  return fn


def row_seeds(rng_key_data: np.ndarray, step: int, n: int) -> list[int]:
  """n sampling seeds in [0, 2**32), a function of the state's rng and the step only."""
  entropy = [int(x) for x in np.asarray(rng_key_data, np.uint32).reshape(-1)] + [step]
  return [int(s) for s in np.random.SeedSequence(entropy).generate_state(n, np.uint32)]


def learner_rows(prompts: list[list[int]], completions: list[list[int]], length: int
                 ) -> dict[str, np.ndarray]:
  """Right-padded rows prompt + completion [N, length] with targets (the next token) and
  mask (1 where the target is a completion token)."""
  n = len(prompts)
  out = {k: np.zeros((n, length), np.int32)
         for k in ("tokens", "positions", "segment_ids", "targets")}
  out["mask"] = np.zeros((n, length), np.float32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    row = p + c
    out["tokens"][i, :len(row)] = row
    out["positions"][i, :len(row)] = np.arange(len(row))
    out["segment_ids"][i, :len(row)] = 1
    out["targets"][i, :len(row) - 1] = row[1:]
    out["mask"][i, len(p) - 1:len(row) - 1] = 1.0
  return out


class Rollouts(hooks.Hook):
  """The RLHF phase of every step, as the loop's hook: its before_step turns a batch of
  prompts into the learner batch. The reference and the sampler are made at the first
  rollout, once the trainer's state exists."""

  def __init__(self, trainer: loop.Trainer):
    c, r = trainer.config, trainer.config.rlhf
    self.r, self.layout = r, trainer.layout  # the policy; with LoRA, the model with adapters
    self.tokenizer = trainer.tokenizer
    self.length = c.train.seq_len + r.max_new_tokens
    self.score_tokens = jax.jit(functools.partial(
        _teacher_forced, self.layout.graphdef, chunk_size=c.train.loss_chunk_size))
    self.reward_fn = load_reward_fn(r.reward_fn) if r.reward_fn else None
    self.rows = c.data.batch_size * r.k  # learner rows per step, over every host
    if r.reward_model:
      self._load_reward_model(r.reward_model)
    self.samples_path = trainer.workdir / ROLLOUTS_FILE
    self._reference = Reference()
    self._sampler: Sampler | None = None
    self._learner_tokens = 0.0
    self._learner_start: float | None = None
    self.cycle = cycle_length(r)
    rollout_cycle.install(trainer, self.cycle)
    self._minibatch = rollout_cycle.minibatcher(trainer.mesh, r.minibatches)
    self._buffer: dict | None = None

  def reference(self, trainer: loop.Trainer) -> dict:
    """The reference policy's whole parameter dict (trainers/reference.py)."""
    return self._reference.params(trainer)

  def _load_reward_model(self, workdir: str) -> None:
    _, model, tokenizer = load_reward_model(workdir, self.layout.mesh)
    if tokenizer is None or not same_vocabulary(Tokenizer(tokenizer), self.tokenizer):
      raise ConfigError(f"config.rlhf.reward_model={workdir!r}: its tokenizer.model has another "
                        "vocabulary than the policy's; the reward model must read the same ids")
    graphdef, params = nnx.split(model)
    self.reward_params = params
    self.reward_model_fn = jax.jit(
        lambda p, t, pos, seg: sequence_rewards(nnx.merge(graphdef, p), t, pos, seg))

  def sampler(self, trainer: loop.Trainer, params: dict) -> Sampler:
    """The sampler on the trainer's mesh, with the current params (its compiled prefill and
    decode are reused from step to step)."""
    if self._sampler is None:
      self._sampler = Sampler(self.layout.model(params), self.tokenizer, mesh=trainer.mesh,
                              min_width=trainer.config.train.seq_len)  # one prefill shape
    self._sampler.params = nnx.State(params)
    return self._sampler

  # -- one step ------------------------------------------------------------------------------

  def before_step(self, trainer: loop.Trainer, batch: dict) -> dict:
    """The learner batch: at a cycle's first step (every step for RLOO) a rollout of this
    batch's prompts; then minibatch (step % minibatches) of it (trainers/rollout_cycle.py)."""
    index = trainer.step_count % self.cycle
    metrics = {}
    if index == 0:
      self._buffer, metrics = self._rollout(trainer, batch)
    elif self._buffer is None:
      raise ConfigError(f"step {trainer.step_count} is inside a rollout cycle of {self.cycle} "
                        "steps (updates_per_rollout x minibatches changed since the "
                        "checkpoint?): resume from a checkpoint at a multiple of it")
    return {**self._minibatch(self._buffer, index % self.r.minibatches), "metrics": metrics}

  def _rollout(self, trainer: loop.Trainer, batch: dict) -> tuple[dict, dict]:
    """Sample k completions of this host's prompts, score them: (the learner buffer, the
    rollout's metrics); global arrays: every host gives the rows of its own prompts."""
    params = trainer.state.model_params()
    jax.block_until_ready(params)  # the previous train step has finished: time the learner
    start = time.perf_counter()
    learner_seconds = None if self._learner_start is None else start - self._learner_start
    prompts, fields, seeds = self._prompts(trainer, batch)
    r = self.r
    completions = self.sampler(trainer, params).generate(prompts, [
        SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                       top_k=r.top_k, top_p=r.top_p, seed=s, stop=tuple(r.stop))
        for s in seeds])
    rollout_seconds = time.perf_counter() - start
    rows = self._global(trainer.mesh, learner_rows(
        prompts, [c.tokens for c in completions], self.length))
    truncated = self._global(trainer.mesh, np.array([c.finish_reason == "length"
                                                     for c in completions]))
    logp, ref_logp, entropy = self.score_tokens(
        params, self.reference(trainer), rows["tokens"], rows["positions"], rows["segment_ids"],
        rows["targets"])
    scores = self._scores(prompts, completions, fields, rows)
    out = rl.advantages_from(
        scores, logp, ref_logp, rows["mask"], truncated, k=r.k,
        beta=float(r.beta) if r.kl == "reward" else 0.0, clip=float(r.reward_clip),
        truncated_mode=r.truncated, truncated_penalty=float(r.truncated_penalty),
        whiten_advantages=bool(r.whiten_advantages), algorithm=r.algorithm)
    metrics = {k: float(v) for k, v in jax.device_get(_rollout_metrics(
        scores, out["rewards"], out["kl"], rows["mask"], truncated, entropy,
        rows["segment_ids"])).items()}
    self._learner_tokens = metrics.pop("learner_tokens") * r.updates_per_rollout
    metrics["rollout_tokens_per_s"] = metrics.pop("generated_tokens") / rollout_seconds
    if learner_seconds is not None:
      metrics["learner_tokens_per_s"] = self._learner_tokens / learner_seconds
    self._log_samples(trainer, prompts, completions, sharding.host_rows(scores),
                      sharding.host_rows(out["kl"]))
    learner = {k: rows[k] for k in ("tokens", "positions", "segment_ids", "targets")}
    learner["loss_weights"] = _loss_weights(out["advantages"], rows["mask"])
    learner.update(completion_mask=rows["mask"], old_logprobs=logp, ref_logprobs=ref_logp)
    self._learner_start = time.perf_counter()
    return learner, metrics

  def _prompts(self, trainer: loop.Trainer, batch: dict
               ) -> tuple[list[list[int]], list[dict], list[int]]:
    """This host's prompt rows, each repeated k times (prompt-major: completion j of prompt
    p is row p * k + j), their record fields, and the rows' sampling seeds: a function of
    (state rng, step, the prompt's place in the batch's record order) only, so the number of
    hosts changes nothing."""
    k, total = self.r.k, batch["tokens"].shape[0]
    tokens, segment_ids = sharding.host_rows(batch["tokens"]), sharding.host_rows(
        batch["segment_ids"])
    prompts = [row[seg > 0].tolist() for row, seg in zip(tokens, segment_ids)]
    seeds = row_seeds(jax.device_get(trainer.state.rng), trainer.step_count, total * k)
    return ([p for p in prompts for _ in range(k)],
            [ref for ref in batch["reference"] for _ in range(k)],
            [seeds[i * k + j] for i in trainer.data.record_positions() for j in range(k)])

  def _global(self, mesh, local):
    """Global batch arrays of N = prompts x k rows from this host's block of them."""
    return jax.tree.map(lambda x: sharding.global_batch(mesh, x, self.rows), local)

  def _scores(self, prompts: list[list[int]], completions: list[Completion],
              fields: list[dict], rows: dict) -> jax.Array:
    """[N] the completions' scores: the reward model's on the mesh, or reward_fn's for this
    host's rows (a wrong count or a non-finite score stops every host, naming the key)."""
    if self.reward_fn is None:
      return self.reward_model_fn(self.reward_params, rows["tokens"], rows["positions"],
                                  rows["segment_ids"])
    tok = self.tokenizer
    names = sorted({k for f in fields for k in f})
    columns = {k: [f.get(k) for f in fields] for k in names}
    try:
      scores = np.asarray([float(s) for s in self.reward_fn(
          [tok.decode(p, skip_control=True) for p in prompts], [c.text for c in completions],
          **columns)], np.float32)
      error = _bad_scores(scores, completions)
    except Exception as e:  # noqa: BLE001 -- user code: stop every host with its message
      error = f"raised {type(e).__name__}: {e}"
    if error:
      error = f"config.rlhf.reward_fn={self.r.reward_fn!r} {error}"
    distributed.raise_together(error, ConfigError)
    return self._global(self.layout.mesh, scores)

  def _log_samples(self, trainer: loop.Trainer, prompts, completions, scores, kl) -> None:
    # step: the rollout's first train step; its cycle's steps step .. step + cycle - 1 hold
    # a log step (a multiple of logging.every) or the last one.
    c, step, every = trainer.config, trainer.step_count + 1, trainer.config.logging.every
    if not (trainer.is_main and self.r.samples_logged and
            (step == 1 or (step - 1) // every < (step - 1 + self.cycle) // every
             or step + self.cycle > c.train.steps)):
      return
    tok = trainer.tokenizer
    with open(self.samples_path, "a") as f:
      for i in range(min(self.r.samples_logged, len(completions))):
        record = {"step": step, "prompt": tok.decode(prompts[i], skip_control=True),
                  "completion": completions[i].text, "score": float(scores[i]),
                  "kl": float(kl[i]), "finish_reason": completions[i].finish_reason}
        f.write(json.dumps(record) + "\n")
        if c.logging.console:
          print(f"  sample {i}: {record['prompt']!r} -> {record['completion']!r} "
                f"(score {record['score']:.3f}, kl {record['kl']:.3f})", flush=True)


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
  """Same pieces under the same ids (two files trained alike differ only in their metadata)."""
  probe = "Why is the sky blue? 12 + 7 = 19. <start_of_turn>user\nHi<end_of_turn>"
  return (a.vocab_size == b.vocab_size and a.encode(probe) == b.encode(probe)
          and all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size)))


def _bad_scores(scores: np.ndarray, completions: list[Completion]) -> str | None:
  """What is wrong with a reward function's scores, or None."""
  if len(scores) != len(completions):
    return f"returned {len(scores)} scores for {len(completions)} completions"
  if not np.isfinite(scores).all():
    bad = int(np.flatnonzero(~np.isfinite(scores))[0])
    return f"returned a non-finite score ({scores[bad]}) for completion {completions[bad].text!r}"
  return None


@jax.jit
def _rollout_metrics(scores, rewards, kl, mask, truncated, entropy, segment_ids):
  """The step's rollout metrics over every host's rows (replicated scalars)."""
  return {"reward_mean": jnp.mean(scores), "reward_std": jnp.std(scores),
          "shaped_reward_mean": jnp.mean(rewards), "kl": jnp.mean(kl),
          "completion_length": jnp.mean(jnp.sum(mask, axis=1)),
          "truncated": jnp.mean(truncated.astype(jnp.float32)),
          "entropy": jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0),
          "generated_tokens": jnp.sum(mask), "learner_tokens": jnp.sum(segment_ids > 0)}


@jax.jit
def _loss_weights(advantages, mask):
  """[N, T] the row's advantage on each completion target: sum_t w * (-log p) is then
  -A_i sum_t log pi(y_i,t) (rl.rloo_loss)."""
  return (advantages[:, None] * mask).astype(jnp.float32)


def _teacher_forced(graphdef, params, reference, tokens, positions, segment_ids, targets, *,
                    chunk_size: int):
  """Per-token log-probs of the policy and the reference and the policy's entropy [N, T],
  at temperature 1 (what the loss differentiates), with no gradient."""

  def run(p):
    model = nnx.merge(graphdef, nnx.State(p))
    features = model.features(tokens, positions, segment_ids)
    return rl.completion_logprobs(features, model.embedder.input_embedding[...], targets,
                                  final_softcap=model.config.final_logits_softcap,
                                  chunk_size=chunk_size)

  logp, entropy = run(params)
  ref_logp, _ = run(reference)
  return logp, ref_logp, entropy


# RLOO's loss reads only BATCH_KEYS; GRPO's also the buffer's behaviour and reference
# log-probs (one task for both: the algorithm is a config value).
TASK = loop.Task(name="rlhf", data_format="rl", make_loss=make_loss,
                 batch_keys=(*BATCH_KEYS, *grpo.BUFFER_KEYS), hooks=(Rollouts,))

if __name__ == "__main__":
  sys.exit(cli.main(TASK))
