"""The job-config schema: every key with its default. Job files (tiny.py, pod.py, ...) start
from `get_config()` and override values; the config is locked, so a misspelt key fails.

Sections: model, mesh, sharding, train, optimizer, data, tokenizer, eval, checkpoint, logging,
init_from, lora, samples, reward, rlhf and dpo (the last three read only by those trainers).
Every ModelConfig field can be overridden under `model` (None = the preset's value), e.g.
`--config.model.remat_policy=full`. `data.seq_len` and `data.batch_size` are linked to
`train.seq_len` and `train.global_batch_size`: setting either side sets both.
`validate(config, num_devices)` checks values and combinations, naming the key at fault.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from ml_collections import config_dict

from gemma_jax import exits, lora, rl, sharding
from gemma_jax.checkpoint import CONFIG_FILE
from gemma_jax.config import ModelConfig
from gemma_jax.data import default_config as data_config
from gemma_jax.data.config import parse_config as parse_data_config
from gemma_jax.model import attention_impl
from gemma_jax.optim import make_optimizer

_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
NON_FINITE = ("skip", "stop")


class ConfigError(exits.UsageError):
  """A job config that cannot run; the message names the key."""


def _model_overrides() -> dict:
  out = {}
  for f in dataclasses.fields(ModelConfig):
    if f.name == "name":
      continue
    kind = str(f.type).split(" | ")[0].split("[")[0]
    out[f.name] = config_dict.placeholder(_FIELD_TYPES.get(kind, object))
  return out


def _data_section(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # sources as a tuple: ml_collections can override tuples (not lists) from the command line,
  # --config.data.sources="({'path': 'a.jsonl'},)".
  data = ml_collections.ConfigDict({**data_config().to_dict(), "sources": ()})
  data.seq_len = train.get_ref("seq_len")
  data.batch_size = train.get_ref("global_batch_size")
  return data


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"preset": "tiny_gemma3", **_model_overrides()})
  # Mesh sizes; one may be -1 (fill). dcn_* = slices in a multi-slice pod.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                          dcn_tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(
      # Fail at start-up when more than this fraction of parameter bytes is replicated.
      max_replicated_fraction=0.05))
  c.train = ml_collections.ConfigDict(dict(
      steps=100, global_batch_size=8, seq_len=128, microbatches=1, seed=0, z_loss=0.0,
      loss_chunk_size=4096,
      # A step whose loss or gradient norm is not finite leaves the state unchanged and is
      # reported; "stop" then ends the run with an error, and so does "skip" after
      # max_skipped_in_a_row such steps in a row (0 = never); either saves first.
      non_finite="skip", max_skipped_in_a_row=5))
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, schedule="cosine", warmup_steps=10, end_lr_fraction=0.1, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=0.1, decay_embedding=False, decay_norms=False,
      grad_clip_norm=1.0))
  c.data = _data_section(c.train)  # gemma_jax.data's schema, see gemma_jax/data/config.py
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",          # a SentencePiece .model file (Gemma's for real runs) ...
      train_corpus="",  # ... or text to train a small one on at start-up (CPU demos)
      vocab_size=512))  # pieces of the trained one
  c.eval = ml_collections.ConfigDict(dict(
      every=0,          # steps between evaluations (and one at the end); 0 = no evaluation
      batches=4,        # batches per evaluation, always the same ones
      sources=(),       # like data.sources; read in order, with data's format and packing
      # gemma_jax.eval tasks (shipped names or task files) run at the same steps, their
      # metrics logged as eval_<task>_<metric>; task_limit: first N examples (0 = all).
      tasks=(), task_limit=0))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=1000,       # steps between checkpoints; the last step and SIGTERM also save
      keep=3,           # the newest `keep` checkpoints are kept ...
      keep_every=0,     # ... and every step that is a multiple of this (0 = none)
      async_save=True))  # write in the background while training goes on
  c.logging = ml_collections.ConfigDict(dict(
      every=10, console=True, jsonl=True, tensorboard=True))
  # A directory that loads as a model (gemma_jax.model_dir: a converted model, a trainer's
  # workdir, a LoRA run's, merged) whose params start the run instead of a random init;
  # unused once the workdir holds a checkpoint.
  c.init_from = ""
  # LoRA / QLoRA (gemma_jax.lora); rank 0 = full training. With rank > 0 only the adapters
  # are trained and hold optimizer state; the base (init_from, else the random init) is frozen
  # and, with quantize, stored block-quantized and dequantized in the matmuls.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, targets=lora.TARGETS,
      quantize="",       # one of lora.QUANTIZE: "" | "int8" | "int4" | "nf4"
      block_size=64))    # weights per quantization scale
  # Sample generations from the current weights, logged to the console and
  # WORKDIR/samples.jsonl every `every` steps (and at the end); 0 = never.
  c.samples = ml_collections.ConfigDict(dict(
      every=0, prompts=(), max_new_tokens=32, temperature=0.0,
      chat=True))        # wrap each prompt as a user turn of the chat template
  # python -m trainers.reward: Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin).
  c.reward = ml_collections.ConfigDict(dict(margin=0.0))
  # python -m trainers.rlhf (REINFORCE with a leave-one-out baseline; see gemma_jax/rl.py).
  # data.batch_size prompts per step, k completions each; data.seq_len is the prompt buffer.
  c.rlhf = ml_collections.ConfigDict(dict(
      k=4,                  # completions per prompt (the RLOO group; >= 2)
      max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
      stop=(),              # stop strings besides the stop tokens (EOS, <end_of_turn>)
      beta=0.05,            # KL penalty: R = r - beta * sum_t (log pi - log pi_ref)
      reward_fn="",         # "module:function(prompts, completions, **fields) -> floats" ...
      reward_model="",      # ... or a reward-trainer workdir (exactly one of the two)
      reward_clip=0.0,      # > 0: scores clipped to [-reward_clip, reward_clip]
      truncated="keep",     # completions that hit max_new_tokens: keep | zero | penalty
      truncated_penalty=1.0,  # subtracted from their score with truncated="penalty"
      whiten_advantages=False,
      samples_logged=4,     # completions printed and written to rollouts.jsonl per log step
      # "rloo" | "grpo" (gemma_jax/grpo.py): group-normalised advantages, a clipped ratio
      # against the behaviour policy, several updates per rollout. GRPO only:
      algorithm="rloo",
      updates_per_rollout=1,  # passes over each rollout's completions ...
      minibatches=1,        # ... each in this many optimizer steps (one loop step each)
      clip_eps=0.2,         # ratio clipped to [1 - clip_eps, 1 + clip_eps]; 0 = no clipping
      kl="reward",          # beta shapes R ("reward") or weighs a k3 KL loss term ("loss")
      normalisation="token"))  # "token" mean or "sequence" mean of the token losses
  # python -m trainers.dpo (gemma_jax/dpo.py): the reference is the starting policy.
  c.dpo = ml_collections.ConfigDict({
      "beta": 0.1, "label_smoothing": 0.0,
      "loss": "sigmoid"})   # "sigmoid" (DPO; label_smoothing > 0: conservative DPO) | "ipo"
  c.lock()
  return c


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig named by config.model.preset with the non-None overrides applied."""
  from gemma_jax.config import get_config as preset

  overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
  if "attention_pattern" in overrides:
    overrides["attention_pattern"] = tuple(overrides["attention_pattern"])
  return preset(c.model.preset, **overrides)


def validate(c: ml_collections.ConfigDict, num_devices: int) -> ModelConfig:
  """Raise ConfigError naming the key when the job cannot run; returns the ModelConfig.

  Cheap checks only (no model is built): this runs before anything else at start-up.
  """
  _check_schema(c, get_config(), "config")
  cfg = validate_layout(c, num_devices)
  t = c.train
  if t.z_loss < 0:
    raise ConfigError(f"config.train.z_loss={t.z_loss} must be >= 0")
  if t.non_finite not in NON_FINITE:
    raise ConfigError(f"config.train.non_finite={t.non_finite!r}; choose one of {NON_FINITE}")
  _check_optimizer(c)
  _check_data(c)
  _check_tokenizer(c.tokenizer, cfg)
  _at_least(c.checkpoint, "checkpoint", every=1, keep=1, keep_every=0)
  _at_least(c.logging, "logging", every=1)
  _at_least(c.eval, "eval", every=0, batches=1, task_limit=0)
  _check_eval_tasks(c.eval)
  _check_reward_and_rlhf(c)
  _check_lora_and_samples(c)
  if c.init_from and not os.path.isfile(os.path.join(c.init_from, CONFIG_FILE)):
    raise ConfigError(f"config.init_from={c.init_from!r} is not a model directory "
                      "(no config.json)")
  return cfg


def _check_lora_and_samples(c) -> None:
  if c.lora.rank < 0:
    raise ConfigError(f"config.lora.rank={c.lora.rank} must be >= 0 (0 = full training)")
  if not c.lora.rank and c.lora.quantize:
    raise ConfigError(f"config.lora.quantize={c.lora.quantize!r} needs config.lora.rank > 0: "
                      "a quantized base can only be trained through adapters")
  try:
    lora.LoRAConfig.from_config(c.lora)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from e
  s = c.samples
  _at_least(s, "samples", every=0, max_new_tokens=1)
  if s.temperature < 0:
    raise ConfigError(f"config.samples.temperature={s.temperature} must be >= 0")
  if not all(isinstance(p, str) and p for p in s.prompts):
    raise ConfigError(f"config.samples.prompts={s.prompts!r} must hold non-empty strings")
  if s.every and not s.prompts:
    raise ConfigError(f"config.samples.every={s.every} needs config.samples.prompts")


def _check_reward_and_rlhf(c) -> None:
  """Value ranges only; what needs the job (a reward source, prompt + completion length)
  is checked by trainers/rlhf.py at start-up."""
  if c.reward.margin < 0:
    raise ConfigError(f"config.reward.margin={c.reward.margin} must be >= 0")
  r = c.rlhf
  _at_least(r, "rlhf", k=2, max_new_tokens=1, top_k=0, samples_logged=0)
  if not r.temperature > 0:
    raise ConfigError(f"config.rlhf.temperature={r.temperature} must be > 0 (RLOO needs "
                      "different completions of a prompt)")
  if not 0 < r.top_p <= 1:
    raise ConfigError(f"config.rlhf.top_p={r.top_p} must be in (0, 1]")
  for key in ("beta", "reward_clip", "truncated_penalty"):
    if r[key] < 0:
      raise ConfigError(f"config.rlhf.{key}={r[key]} must be >= 0")
  if r.truncated not in rl.TRUNCATED_MODES:
    raise ConfigError(f"config.rlhf.truncated={r.truncated!r}; choose one of "
                      f"{rl.TRUNCATED_MODES}")
  if not all(isinstance(s, str) and s for s in r.stop):
    raise ConfigError(f"config.rlhf.stop={r.stop!r} must hold non-empty strings")
  if r.reward_fn and r.reward_model:
    raise ConfigError("config.rlhf: set only one of reward_fn or reward_model")
  if r.reward_fn and r.reward_fn.count(":") != 1:
    raise ConfigError(f"config.rlhf.reward_fn={r.reward_fn!r} must be 'module:function'")


def _check_schema(c, schema, where: str) -> None:
  """Every key known and of its schema's type (configs built in Python skip ConfigDict's
  own checks when they are assembled from plain dicts)."""
  if not isinstance(c, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"{where} must be a section (ConfigDict), got {type(c).__name__}")
  keys, known = set(c.keys()), set(schema.keys())
  if unknown := sorted(keys - known):
    raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
  if missing := sorted(known - keys):
    raise ConfigError(f"{where}: missing key(s) {missing}; start job configs from "
                      "configs.base.get_config()")
  for key in known:
    value, default = c[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      _check_schema(value, default, f"{where}.{key}")
    elif not _type_ok(value, default, schema, key):
      raise ConfigError(f"{where}.{key}={value!r} should be of type {type(default).__name__}")


def _type_ok(value, default, schema, key) -> bool:
  if value is None or default is None:  # placeholders (model overrides, num_epochs)
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def validate_layout(c: ml_collections.ConfigDict, num_devices: int,
                    platform: str | None = None) -> ModelConfig:
  """The checks of `validate` that a step's shape and layout must pass (model, train sizes,
  mesh, attention kernel), without data or tokenizer: what launch.plan asks of each
  candidate. platform: where the step runs ('tpu' for a topology compile), default this
  process's backend."""
  try:
    cfg = model_config(c)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  t = c.train
  _at_least(t, "train", steps=1, global_batch_size=1, seq_len=2, microbatches=1,
            loss_chunk_size=1, max_skipped_in_a_row=0)
  if t.seq_len > cfg.max_seq_len:
    raise ConfigError(f"config.train.seq_len={t.seq_len} exceeds the model's max_seq_len="
                      f"{cfg.max_seq_len} (config.model.max_seq_len)")
  _check_mesh(c, cfg, num_devices)
  if why := attention_impl.problem(cfg, t.seq_len, platform or jax.default_backend()):
    raise ConfigError(f"config.{why}")
  return cfg


def _at_least(section, name: str, **lows: int) -> None:
  for key, low in lows.items():
    if section[key] < low:
      raise ConfigError(f"config.{name}.{key}={section[key]} must be >= {low}")


def _check_mesh(c, cfg: ModelConfig, num_devices: int) -> None:
  try:
    data, fsdp, tensor = sharding.mesh_shape(c.mesh, num_devices, "config.mesh")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  t = c.train
  rows = data * fsdp * t.microbatches
  if t.global_batch_size % rows:
    raise ConfigError(
        f"config.train.global_batch_size={t.global_batch_size} must be a multiple of "
        f"mesh data x fsdp x train.microbatches = {data} x {fsdp} x {t.microbatches}: every "
        "microbatch is split over the batch shards")
  if tensor > 1 and cfg.vocab_size % tensor:
    raise ConfigError(f"config.mesh.tensor={tensor} does not divide the vocabulary "
                      f"({cfg.vocab_size}) for the vocabulary-parallel loss")


def _check_optimizer(c) -> None:
  o = c.optimizer
  try:
    make_optimizer(o, c.train.steps)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from e
  for key in ("b1", "b2"):
    if not 0 <= o[key] < 1:
      raise ConfigError(f"config.optimizer.{key}={o[key]} must be in [0, 1)")
  if not 0 <= o.end_lr_fraction <= 1:
    raise ConfigError(f"config.optimizer.end_lr_fraction={o.end_lr_fraction} must be in [0, 1]")
  for key in ("learning_rate", "eps", "weight_decay", "grad_clip_norm"):
    if o[key] < 0:
      raise ConfigError(f"config.optimizer.{key}={o[key]} must be >= 0")


def _check_data(c) -> None:
  _parse_data(c.data, "")
  if c.eval.every:
    if not c.eval.sources and not c.eval.tasks:
      raise ConfigError(f"config.eval.every={c.eval.every} needs config.eval.sources or "
                        "config.eval.tasks")
    if c.eval.sources:
      _parse_data(eval_data_config(c), "config.eval.sources, read with config.data: ")


def _check_eval_tasks(e) -> None:
  """Every task in config.eval.tasks loads (its file and records are checked now)."""
  from gemma_jax.eval.tasks import load_task

  for task in e.tasks:
    try:
      load_task(task)
    except (ValueError, FileNotFoundError) as err:
      raise ConfigError(f"config.eval.tasks: {err}") from err


def _parse_data(data, prefix: str) -> None:
  try:
    parse_data_config(data)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"{prefix}{e}") from e


def eval_data_config(c) -> ml_collections.ConfigDict:
  """config.data for evaluation: eval.sources, read in order, repeating."""
  data = ml_collections.ConfigDict(c.data.to_dict())
  data.update(sources=tuple(c.eval.sources), shuffle=False, num_epochs=None)
  return data


def _check_tokenizer(tok, cfg: ModelConfig) -> None:
  if bool(tok.path) == bool(tok.train_corpus):
    raise ConfigError("config.tokenizer: set exactly one of tokenizer.path (a SentencePiece "
                      "model) or tokenizer.train_corpus (text to train one on)")
  path = tok.path or tok.train_corpus
  if not os.path.isfile(path):
    key = "path" if tok.path else "train_corpus"
    raise ConfigError(f"config.tokenizer.{key}={path!r}: no such file")
  if tok.train_corpus and not 300 <= tok.vocab_size <= cfg.vocab_size:
    raise ConfigError(f"config.tokenizer.vocab_size={tok.vocab_size} must be in [300, "
                      f"model vocab_size={cfg.vocab_size}] (byte fallback needs 259 pieces)")
