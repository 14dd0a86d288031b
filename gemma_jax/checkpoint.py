"""Model directories: the weights, ModelConfig and tokenizer of one model, saved atomically.

Layout of a model directory (what `gemma_jax.convert` writes and generate/serve/trainers read):
  config.json       dataclasses.asdict(ModelConfig)
  tokenizer.model   SentencePiece model (optional)
  params/           orbax checkpoint of the parameter tree (nnx.State.to_pure_dict())

Everything is written into a sibling temporary directory which is renamed into place last, so
a crash mid-save never leaves a half-written model under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gemma_jax import distributed
from gemma_jax.config import ModelConfig
from gemma_jax.model import Transformer, abstract_model

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"

log = logging.getLogger(__name__)


def save_model_dir(directory: str | os.PathLike, cfg: ModelConfig, params,
                   tokenizer_model: bytes | str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
  """Save params (an nnx.State, a pure dict, or a Transformer) with their config and tokenizer."""
  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"model directory {directory} exists; pass overwrite=True to replace it")
  if isinstance(params, Transformer):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = params.to_pure_dict()
  staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(staging / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  (staging / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  if tokenizer_model is not None:
    data = (tokenizer_model if isinstance(tokenizer_model, bytes)
            else Path(tokenizer_model).read_bytes())
    (staging / TOKENIZER_FILE).write_bytes(data)
  _replace_dir(staging, directory)
  return directory


def _replace_dir(new: Path, target: Path) -> None:
  old = target.with_name(f".{target.name}.old-{os.getpid()}")
  if target.exists():
    target.rename(old)
  new.rename(target)
  shutil.rmtree(old, ignore_errors=True)


def load_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; is {directory} a model directory "
                            f"(config.json, params/, tokenizer.model)?")
  fields = json.loads(path.read_text())
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown := set(fields) - known:
    raise ValueError(f"{path}: unknown ModelConfig field(s) {sorted(unknown)}")
  fields["attention_pattern"] = tuple(fields["attention_pattern"])
  return ModelConfig(**{**fields, **overrides})


def load_model_dir(directory: str | os.PathLike, shardings=None,
                   **config_overrides) -> tuple[ModelConfig, Transformer, Path | None]:
  """(config, model, tokenizer path or None) from a model directory.

  shardings: optional pytree of jax.sharding.Sharding matching the parameter pure dict; each
  array is restored straight into its shards. config_overrides change numerics only (e.g.
  dtype='float32', param_dtype='bfloat16'); shapes must match the saved ones.
  A trainer workdir (no params/, a checkpoints/ folder) loads its newest checkpoint's params
  (load_trainer_checkpoint); a LoRA run's workdir (lora.json) its base with the newest
  adapters (gemma_jax.lora.load; unsharded).
  """
  directory = Path(directory).absolute()
  if not (directory / PARAMS_DIR).exists() and (directory / TRAIN_CHECKPOINT_DIR).is_dir():
    if (directory / "lora.json").is_file():  # a LoRA run: its base plus the adapters
      from gemma_jax import lora  # local: gemma_jax.lora imports this module

      return lora.load(directory, **config_overrides)
    return load_trainer_checkpoint(directory, shardings=shardings, **config_overrides)
  cfg = load_config(directory, **config_overrides)
  model = abstract_model(cfg)
  graphdef, abstract = nnx.split(model)
  target = abstract.to_pure_dict()
  if shardings is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          target, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          target)
  try:
    params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{directory / PARAMS_DIR}: parameters do not match {cfg.name!r}: {e}") from e
  abstract.replace_by_pure_dict(params)
  tokenizer = directory / TOKENIZER_FILE
  return cfg, nnx.merge(graphdef, abstract), tokenizer if tokenizer.is_file() else None


# Trainer checkpoints: the whole train state of a run, under WORKDIR/checkpoints/<step>/.
TRAIN_CHECKPOINT_DIR = "checkpoints"


class TrainCheckpointer:
  """An orbax CheckpointManager for train states {params, opt_state, step, rng}.

  Each step directory holds the items `params`, `opt_state`, `meta` ({step, rng}) and `data`
  (the grain iterator state of every process: process_{i}-of-{n}.json). orbax writes a step
  into a temporary directory and renames it when every item is complete, so a crash mid-save
  leaves the previous checkpoint as the newest; a step that fails to restore (a damaged
  file) is reported and the next older one is tried. Restoring into ShapeDtypeStructs with
  another mesh's shardings reshards. Kept: the newest `keep` steps and every multiple of
  `keep_every` (0 = none).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int, keep_every: int = 0,
               async_save: bool = True):
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: dict, data_iterator=None) -> int:
    """Start saving (in the background if async); the data position is captured now."""
    import grain  # local: model-directory users need no data pipeline

    step = int(state["step"])
    items = {"params": ocp.args.StandardSave(state["params"]),
             "opt_state": ocp.args.StandardSave(state["opt_state"]),
             "meta": ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    return step

  def restore(self, step: int, abstract_state: dict, data_iterator=None) -> dict:
    """The state at `step` laid out as `abstract_state` says (ShapeDtypeStructs with
    shardings); `data_iterator` is moved to the saved position."""
    import grain

    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"]),
             "meta": ocp.args.StandardRestore({"step": abstract_state["step"],
                                               "rng": abstract_state["rng"]})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return {"params": out["params"], "opt_state": out["opt_state"], **out["meta"]}

  def restore_latest(self, abstract_state: dict, data_iterator=None) -> dict | None:
    """The newest step that restores, or None when there is no checkpoint. With several
    processes a step counts only if it restores on every one (e.g. each reads its own data
    state), so all fall back to the same older step together."""
    errors = []
    for step in reversed(self.steps()):
      try:
        state, error = self.restore(step, abstract_state, data_iterator), None
      except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many kinds
        state, error = None, f"{type(e).__name__}: {e}"
      if distributed.all_true(error is None):
        return state
      error = error or "it does not restore on another process"
      log.warning("checkpoint %s/%d does not restore (%s); trying an older one",
                  self.directory, step, error)
      errors.append(f"step {step}: {error}")
    if errors:
      raise ValueError(f"{self.directory}: no checkpoint restores:\n" + "\n".join(errors))
    return None

  def reached_preemption(self, step: int) -> bool:
    """True on every process once JAX's preemption service saw a SIGTERM (multi-host)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def load_trainer_checkpoint(workdir: str | os.PathLike, step: int | None = None, shardings=None,
                            **config_overrides) -> tuple[ModelConfig, Transformer, Path | None]:
  """(config, model, tokenizer path or None) from a trainer workdir, as load_model_dir.

  A workdir (python -m trainers.pretrain --workdir DIR) holds config.json and tokenizer.model
  like a model directory, and the train checkpoints under checkpoints/; the params of `step`
  (default: the newest) are restored, nothing else. load_model_dir(workdir) calls this.
  """
  workdir = Path(workdir).absolute()
  cfg = load_config(workdir, **config_overrides)
  graphdef, abstract = nnx.split(abstract_model(cfg))
  abstract.replace_by_pure_dict(restore_train_params(workdir, abstract.to_pure_dict(),
                                                     shardings, step))
  tokenizer = workdir / TOKENIZER_FILE
  return cfg, nnx.merge(graphdef, abstract), tokenizer if tokenizer.is_file() else None


def restore_train_params(workdir: str | os.PathLike, abstract: dict, shardings=None,
                         step: int | None = None) -> dict:
  """The `params` entry of a trainer workdir's checkpoint `step` (default: the newest),
  restored into the shapes of `abstract` with `shardings` (default: all on one device)."""
  directory = Path(workdir).absolute() / TRAIN_CHECKPOINT_DIR
  manager = ocp.CheckpointManager(directory,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{directory}: no step {step}; steps: {steps}")
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target)))["params"]
