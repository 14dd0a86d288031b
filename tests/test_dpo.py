"""DPO / IPO (gemma_jax/dpo.py, trainers/dpo.py): the pair losses against float64 NumPy
loops, the model-side loss and its gradient against full logits and finite differences, the
CPU demo's held-out reward accuracy, and a bit-exact stop + resume of a LoRA run whose
reference is the base with its zero-effect adapters."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_multihost import metrics as records
from test_rl import reference_token_logprobs
from test_rlhf import caches, final_params  # noqa: F401  (caches: a fixture)

from configs import dpo_tiny
from configs.base import ConfigError
from gemma_jax import dpo
from gemma_jax.config import get_config
from gemma_jax.model import init_model
from trainers import dpo as dpo_trainer
from trainers import hooks, loop

REPO = Path(__file__).resolve().parent.parent
CFG = get_config("tiny_gemma2", dtype="float32")  # final-logit soft-cap on the path
T = 16


def packed_side(rows: list[list[tuple[list[int], list[int]]]]) -> dict[str, np.ndarray]:
  """Rows of packed (prompt, response) segments: tokens, positions, segment_ids, targets and
  loss_weights [B, T] (weight 1 where the target is a response token)."""
  out = {k: np.zeros((len(rows), T), np.int32)
         for k in ("tokens", "positions", "segment_ids", "targets")}
  out["loss_weights"] = np.zeros((len(rows), T), np.float32)
  for i, segments in enumerate(rows):
    start = 0
    for s, (prompt, response) in enumerate(segments, 1):
      seq, end = prompt + response, start + len(prompt) + len(response)
      out["tokens"][i, start:end] = seq
      out["positions"][i, start:end] = np.arange(len(seq))
      out["segment_ids"][i, start:end] = s
      out["targets"][i, start:end - 1] = seq[1:]
      out["loss_weights"][i, start + len(prompt) - 1:end - 1] = 1.0
      start = end
  return out


def preference_batch(seed=0):
  """4 rows; rows 0 and 2 hold two pairs, row 3 one pair and padding; random reference
  log-probs on the response targets."""
  rng = np.random.default_rng(seed)
  tok = lambda n: rng.integers(4, CFG.vocab_size, n).tolist()
  layout = [2, 1, 2, 1]
  pairs = [[(tok(2), tok(rng.integers(1, 3)), tok(rng.integers(1, 4))) for _ in range(n)]
           for n in layout]
  batch = {}
  for side, pick in (("chosen", 1), ("rejected", 2)):
    rows = packed_side([[(p[0], p[pick]) for p in row] for row in pairs])
    rows["ref_logprobs"] = (-rng.uniform(0.5, 6, (len(layout), T)) *
                            (rows["loss_weights"] > 0)).astype(np.float32)
    batch.update({f"{side}_{k}": v for k, v in rows.items()})
  return batch


def numpy_pairs(batch, logp_of):
  """[(policy chosen, ref chosen, policy rejected, ref rejected)] per pair, float64 loops."""
  out = []
  for i in range(batch["chosen_tokens"].shape[0]):
    sums = {}
    for side in dpo.SIDES:
      lp, seg = logp_of(side)[i], batch[f"{side}_segment_ids"][i]
      w, ref = batch[f"{side}_loss_weights"][i], batch[f"{side}_ref_logprobs"][i]
      for s in sorted(set(seg) - {0}):
        sums[side, s] = (sum(lp[t] * w[t] for t in range(T) if seg[t] == s),
                         sum(float(ref[t]) * w[t] for t in range(T) if seg[t] == s))
    out += [(*sums["chosen", s], *sums["rejected", s])
            for s in sorted({s for (_, s) in sums})]
  return out


def numpy_loss(pairs, beta, smoothing, kind):
  total, extras = 0.0, {"reward_accuracy": 0, "reward_margin": 0, "chosen_reward": 0,
                        "rejected_reward": 0}
  for pc, rc, pr, rr in pairs:
    h = (pc - rc) - (pr - rr)
    log_sig = lambda x: -math.log1p(math.exp(-x))
    total += ((h - 1 / (2 * beta)) ** 2 if kind == "ipo" else
              -(1 - smoothing) * log_sig(beta * h) - smoothing * log_sig(-beta * h))
    c, r = beta * (pc - rc), beta * (pr - rr)
    extras["reward_accuracy"] += c > r
    extras["reward_margin"] += c - r
    extras["chosen_reward"] += c
    extras["rejected_reward"] += r
  return total, len(pairs), extras


@pytest.mark.parametrize("beta,smoothing,kind", [(0.1, 0.0, "sigmoid"), (0.5, 0.2, "sigmoid"),
                                                 (0.3, 0.0, "ipo")])
def test_pair_statistics_match_numpy(beta, smoothing, kind):
  batch = preference_batch(1)
  rng = np.random.default_rng(2)
  logp = {side: -rng.uniform(0.1, 8, (4, T)) for side in dpo.SIDES}
  total, (pairs, extras) = dpo.pair_statistics(
      jnp.asarray(np.stack([logp["chosen"], logp["rejected"]], 1).reshape(8, T), jnp.float32),
      dpo.interleave(batch, "ref_logprobs"), dpo.interleave(batch, "loss_weights"),
      dpo.interleave(batch, "segment_ids"), beta=beta, label_smoothing=smoothing, loss=kind)
  want_total, want_pairs, want_extras = numpy_loss(numpy_pairs(batch, logp.get), beta,
                                                   smoothing, kind)
  assert float(pairs) == want_pairs == 6
  np.testing.assert_allclose(total, want_total, rtol=2e-6)
  for key, value in want_extras.items():
    np.testing.assert_allclose(extras[key], value, rtol=2e-6, atol=1e-5, err_msg=key)
  assert 0 < want_extras["reward_accuracy"] < 6  # both outcomes occur


def test_dpo_loss_value_and_gradient():
  """The train-step loss of the model equals the float64 loops on the full logits' log-probs,
  and its gradient (through the tiled cross-entropy) matches central finite differences."""
  batch = preference_batch(3)
  model = init_model(CFG, seed=4)
  logp = {side: reference_token_logprobs(model, {k: batch[f"{side}_{k}"] for k in (
      "tokens", "positions", "segment_ids", "targets")})[0] for side in dpo.SIDES}
  beta, smoothing = 0.5, 0.1
  want, pairs, _ = numpy_loss(numpy_pairs(batch, logp.get), beta, smoothing, "sigmoid")
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  jbatch = jax.tree.map(jnp.asarray, batch)

  def f(p):
    total, weight, _ = dpo.dpo_loss(nnx.merge(graphdef, nnx.State(p)), jbatch, None, beta=beta,
                                    label_smoothing=smoothing, chunk_size=24)
    return total / weight

  f = jax.jit(f)
  np.testing.assert_allclose(f(params), want / pairs, rtol=1e-5)
  assert_gradient_matches_finite_differences(f, params, seed=5)


def assert_gradient_matches_finite_differences(f, params, seed: int, eps: float = 1e-2):
  """jax.grad(f) against central differences along 3 random unit directions (float32 only:
  ModelConfig has no float64; eps 1e-2 keeps the rounding error near 1e-5)."""
  grad = jax.grad(f)(params)
  rng = np.random.default_rng(seed)
  for _ in range(3):
    raw = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    norm = np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(raw)))
    direction = jax.tree.map(functools.partial(_unit, norm=norm), raw)
    moved = [jax.tree.map(functools.partial(_step, size=s), params, direction)
             for s in (eps, -eps)]
    numeric = (float(f(moved[0])) - float(f(moved[1]))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                          jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-3  # a direction that moves the loss
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=2e-4)


def _unit(d, *, norm):
  return jnp.asarray(d / norm, jnp.float32)


def _step(x, d, *, size):
  return x + size * d


@pytest.mark.slow  # 20 demo steps with evaluation, ~25 s
def test_demo_raises_held_out_reward_accuracy(tmp_path):
  """configs/dpo_tiny.py shortened to 20 steps, as a user runs it (one CPU device): step 1's
  policy is its reference (loss log 2, rewards 0); held-out accuracy at step 20 > 0.9
  (seeded: 1.0, margin about 4.6)."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "XDG_CACHE_HOME": str(tmp_path / "cache")}
  subprocess.run([sys.executable, "-m", "trainers.dpo", "--config", "configs/dpo_tiny.py",
                  "--workdir", str(tmp_path), "--config.train.steps=20",
                  "--config.logging.every=1", "--config.logging.console=False",
                  "--config.logging.tensorboard=False"],
                 cwd=REPO, env=env, check=True, timeout=600)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  first = next(r for r in lines if r["step"] == 1 and "loss" in r)
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert first["chosen_reward"] == first["rejected_reward"] == 0.0
  held_out = {r["step"]: r for r in lines if "eval_reward_accuracy" in r}
  assert held_out[20]["eval_reward_accuracy"] > 0.9, held_out
  assert held_out[20]["eval_reward_margin"] > held_out[10]["eval_reward_margin"] > 0


def stop_after(step):
  def stop(trainer, batch):
    if trainer.step_count + 1 == step:
      trainer.stop_requested.set()
    return batch
  return dataclasses.replace(dpo_trainer.TASK,
                             hooks=(hooks.before_step(stop), *dpo_trainer.TASK.hooks))


@pytest.mark.slow  # ~45 s; SFT's LoRA resume test covers the checkpoint path
def test_lora_resume_continues_identically(tmp_path):
  """8 devices, LoRA rank 4: the reference is the base with the initial adapters (step 1:
  rewards 0); a run stopped at step 2 and resumed equals a straight one bit for bit
  (metrics, evaluation and adapters)."""
  c = dpo_tiny.get_config()
  c.train.steps, c.optimizer.warmup_steps = 4, 1
  c.lora.rank = 4
  c.eval.update(every=4, batches=1)
  c.logging.update(every=1, console=False, tensorboard=False)
  straight, split = tmp_path / "straight", tmp_path / "split"
  loop.run(c, straight, dpo_trainer.TASK)
  assert loop.run(c, split, stop_after(2))["step"] == 2
  loop.run(c, split, dpo_trainer.TASK)
  a, b = records(straight), records(split)
  # Policy and reference log-probs come from two programs (the train step, the hook) here:
  # equal up to float32 rounding of sums of ~20 nats.
  first = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
  assert abs(first["chosen_reward"]) < 1e-5 and abs(first["rejected_reward"]) < 1e-5
  for step in (3, 4):
    for key in ("loss", "reward_accuracy", "reward_margin", "grad_norm"):
      assert a[step][key] == b[step][key], (step, key)
  assert a[4]["eval_reward_margin"] == b[4]["eval_reward_margin"]
  jax.tree.map(np.testing.assert_array_equal, final_params(straight, c, dpo_trainer.TASK),
               final_params(split, c, dpo_trainer.TASK))


@pytest.mark.parametrize("key,value,message", [
    ("beta", 0.0, "config.dpo.beta=0.0 must be > 0"),
    ("label_smoothing", 0.5, "config.dpo.label_smoothing=0.5"),
    ("loss", "hinge", "config.dpo.loss='hinge'")])
def test_config_errors_name_the_key(tmp_path, key, value, message):
  c = dpo_tiny.get_config()
  c.dpo[key] = value
  with pytest.raises(ConfigError, match=message):
    loop.Trainer(c, tmp_path, dpo_trainer.TASK)
