"""The files on disk: model directories (saved atomically) and train checkpoints (orbax).

Layout of a model directory (what `gemma_jax.convert` writes; gemma_jax.model_dir reads it
and every other kind of directory that loads as a model):
  config.json       dataclasses.asdict(ModelConfig)
  tokenizer.model   SentencePiece model (optional)
  params/           orbax checkpoint of the parameter tree (nnx.State.to_pure_dict())

Everything is written into a sibling temporary directory which is renamed into place last, so
a crash mid-save never leaves a half-written model under the final name. Train checkpoints
live under WORKDIR/checkpoints/<step>/ (TrainCheckpointer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gemma_jax import distributed
from gemma_jax.config import ModelConfig
from gemma_jax.train_state import TrainState

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"

log = logging.getLogger(__name__)


def save_model_dir(directory: str | os.PathLike, cfg: ModelConfig, params,
                   tokenizer_model: bytes | str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
  """Save params (an nnx.State, a pure dict, or a model) with their config and tokenizer."""
  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"model directory {directory} exists; pass overwrite=True to replace it")
  if isinstance(params, nnx.Module):
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
  fields = read_json(path)
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: expected a JSON object of ModelConfig fields, got "
                     f"{type(fields).__name__}")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown := set(fields) - known:
    raise ValueError(f"{path}: unknown ModelConfig field(s) {sorted(unknown)}")
  if "attention_pattern" in fields:
    fields["attention_pattern"] = tuple(fields["attention_pattern"])
  try:
    return ModelConfig(**{**fields, **overrides})
  except (TypeError, ValueError) as e:  # a missing field, or a value ModelConfig refuses
    raise ValueError(f"{path}: {e}") from e


def read_json(path: str | os.PathLike):
  """The JSON value in file `path`; invalid JSON is a ValueError naming the file, line and
  column."""
  try:
    return json.loads(Path(path).read_text())
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): is it a JSON file?") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def restore_params(directory: str | os.PathLike, target: dict) -> dict:
  """A model directory's params/, restored into `target` (ShapeDtypeStructs with
  shardings)."""
  path = Path(directory) / PARAMS_DIR
  try:
    return ocp.StandardCheckpointer().restore(path, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path}: parameters do not match {load_config(directory).name!r}: {e}") from e


# Trainer checkpoints: the whole train state of a run, under WORKDIR/checkpoints/<step>/.
TRAIN_CHECKPOINT_DIR = "checkpoints"


class TrainCheckpointer:
  """An orbax CheckpointManager for TrainStates (what trains: a frozen part is rebuilt).

  Each step directory holds the items `params`, `opt_state`, `meta` ({step, rng}) and `data`
  (the grain iterator state of every process: process_{i}-of-{n}.json). orbax writes a step
  into a temporary directory and renames it when every item is complete, so a crash mid-save
  leaves the previous checkpoint as the newest; a step that fails to restore (a damaged
  file) is reported, the next older one is tried, and the damaged one is set aside. Restoring into ShapeDtypeStructs with
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

  def save(self, state: TrainState, data_iterator=None) -> int:
    """Start saving (in the background if async); the data position is captured now."""
    import grain  # local: model-directory users need no data pipeline

    step = int(state.step)
    items = {"params": ocp.args.StandardSave(state.params),
             "opt_state": ocp.args.StandardSave(state.opt_state),
             "meta": ocp.args.StandardSave({"step": state.step, "rng": state.rng})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    return step

  def restore(self, step: int, abstract: TrainState, data_iterator=None) -> TrainState:
    """The state at `step` laid out as `abstract` says (ShapeDtypeStructs with shardings),
    with frozen=None; `data_iterator` is moved to the saved position."""
    import grain

    items = {"params": ocp.args.StandardRestore(abstract.params),
             "opt_state": ocp.args.StandardRestore(abstract.opt_state),
             "meta": ocp.args.StandardRestore({"step": abstract.step, "rng": abstract.rng})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return abstract.replace(params=out["params"], opt_state=out["opt_state"], frozen=None,
                            **out["meta"])

  def restore_latest(self, abstract: TrainState, data_iterator=None) -> TrainState | None:
    """The newest step that restores, or None when there is no checkpoint. Newer steps that
    do not restore are then set aside as <step>.damaged, so that the run can save those steps
    again (when none restores, nothing is renamed). With several processes a step counts only
    if it restores on every one (e.g. each reads its own data state): all fall back together."""
    damaged: list[tuple[int, str]] = []
    for step in reversed(self.steps()):
      try:
        state, error = self.restore(step, abstract, data_iterator), None
      except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many kinds
        state, error = None, f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
      if distributed.all_true(error is None):
        for bad, why in damaged:
          log.warning("checkpoint %s/%d does not restore (%s); set aside as %s, resuming from "
                      "step %d", self.directory, bad, why, self._set_aside(bad), step)
        return state
      damaged.append((step, error or "it does not restore on another process"))
    if damaged:
      raise ValueError(f"{self.directory}: no checkpoint restores: "
                       + "; ".join(f"step {step}: {why}" for step, why in damaged))
    return None

  def _set_aside(self, step: int) -> str:
    """Rename step's directory to <step>.damaged (process 0; the others wait for it)."""
    source = self.directory / str(step)
    target, n = source.with_name(f"{step}.damaged"), 1
    while target.exists():
      n += 1
      target = source.with_name(f"{step}.damaged-{n}")
    distributed.all_true(True)  # every process has chosen the name before it is taken
    if jax.process_index() == 0:
      source.rename(target)
    distributed.all_true(True)  # and sees the rename from here on
    self._manager.reload()
    return target.name

  def reached_preemption(self, step: int) -> bool:
    """True on every process once JAX's preemption service saw a SIGTERM (multi-host)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_train_params(workdir: str | os.PathLike, target: dict,
                         step: int | None = None) -> dict:
  """The `params` entry of a trainer workdir's checkpoint `step` (default: the newest),
  restored into `target` (ShapeDtypeStructs with shardings)."""
  with _read_only_manager(workdir) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{manager.directory}: no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f"{manager.directory}: no step {step}; steps: {steps}")
    return manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))["params"]


def params_metadata(workdir: str | os.PathLike) -> dict | None:
  """The parameter tree (metadata leaves, no arrays) of a workdir's newest checkpoint; None
  when it has none."""
  if not (Path(workdir) / TRAIN_CHECKPOINT_DIR).is_dir():
    return None
  with _read_only_manager(workdir) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    path = Path(manager.directory) / str(step) / "params"
    return ocp.StandardCheckpointer().metadata(path).item_metadata


@contextlib.contextmanager
def _read_only_manager(workdir: str | os.PathLike) -> Iterator[ocp.CheckpointManager]:
  """A read-only manager of WORKDIR/checkpoints, without the warnings orbax logs for one
  (and for a StandardSave item, which has no _CHECKPOINT_METADATA file)."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield ocp.CheckpointManager(Path(workdir).absolute() / TRAIN_CHECKPOINT_DIR,
                                options=ocp.CheckpointManagerOptions(read_only=True))
  finally:
    absl_log.setLevel(level)
