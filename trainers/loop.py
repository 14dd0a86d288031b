"""The one training loop: mesh -> run layout -> state (resumed, init_from or random) -> data
-> jitted step, with periodic work as hooks (trainers/hooks.py): logging, evaluation,
samples, checkpoints (also at the end, on SIGTERM and before an error ends the run), and a
task's own (RLHF's rollouts).

Trainers differ only by a `Task`; pretraining is `Task("pretrain", "pretrain", lm loss)`.
The extension points, and what the trainers put there:
  make_loss(config) -> loss_fn(model, batch, rng) -> (sum, weight) [, extras]
      pretrain and SFT: lm_loss (chat batches weight only model turns); reward model: a
      pairwise loss over the chosen_/rejected_ halves of preference batches; RLHF: the
      policy-gradient loss. extras: a dict of further sums (e.g. correct pairs), reported
      divided by weight (eval: eval_*).
  make_model(model_config, seed) -> nnx.Module
      what the state's params are (default: a Transformer; the reward model adds a value
      head). config.init_from's params fill the paths they share with it; config.lora wraps
      it (gemma_jax.lora.recipe). The state is a gemma_jax.train_state.TrainState.
  data_format, batch_keys
      the config.data.format the task reads and the batch entries its step takes.
  hooks
      factories (trainer -> Hook) of the task's own hooks, made once the trainer is built
      (RLHF: the rollout hook, whose before_step turns prompts into the learner batch).

Workdir: config.json + tokenizer.model (what generate/serve load: the workdir is a model
directory, see gemma_jax.model_dir), train_config.json (the job config), lora.json (a LoRA
run), checkpoints/<step>/ (orbax), metrics.jsonl, tensorboard/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections

from configs.base import ConfigError, validate
from gemma_jax import checkpoint, flops, model_dir, sharding
from gemma_jax import lora as lora_lib
from gemma_jax.config import NUMERICS_FIELDS, ModelConfig
from gemma_jax.data import make_iterator
from gemma_jax.metrics import MetricsWriter, peak_flops_per_device
from gemma_jax.model import init_model, param_count
from gemma_jax.optim import make_optimizer
from gemma_jax.train_state import ModelFn, ModelRecipe, RunLayout, TrainState
from gemma_jax.train_step import BATCH_KEYS, LossFn, jit_train_step
from trainers import hooks as hooks_lib
from trainers import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Task:
  """What one trainer adds to the loop (see the module docstring)."""
  name: str
  data_format: str
  make_loss: Callable[[ml_collections.ConfigDict], LossFn]
  batch_keys: tuple[str, ...] = BATCH_KEYS
  make_model: ModelFn = init_model
  hooks: tuple[hooks_lib.HookFactory, ...] = ()


class Trainer:
  """Everything a run needs, built from a validated config; `train()` runs the loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, task: Task):
    self.model_cfg: ModelConfig = _validate(config, task)
    self.config, self.task = config, task
    self.workdir = Path(workdir).absolute()
    self.is_main = jax.process_index() == 0  # the one process that writes logs and configs
    workdir_lib.create(self.workdir)
    self.mesh = sharding.make_mesh(config.mesh)
    self.tokenizer = workdir_lib.tokenizer(config.tokenizer, self.workdir, self.model_cfg)
    self.lora = lora_lib.LoRAConfig.from_config(config.lora)
    if self.is_main:
      workdir_lib.write_files(self.workdir, config, self.model_cfg, self.lora)
    optimizer, self.schedule = make_optimizer(config.optimizer, config.train.steps)
    recipe = (ModelRecipe(task.make_model) if self.lora is None
              else lora_lib.recipe(self.lora, task.make_model))
    self.layout = RunLayout.build(self.model_cfg, optimizer, self.mesh, recipe)
    self.layout.check_replication(config.sharding.max_replicated_fraction)
    self.loss_fn = task.make_loss(config)  # the losses shard on the mesh of jax.set_mesh
    self._train_step = jit_train_step(self.layout, self.loss_fn, self.schedule,
                                      microbatches=config.train.microbatches,
                                      batch_keys=task.batch_keys)
    try:
      self.data = make_iterator(config.data, self.tokenizer, self.mesh)
    except ValueError as e:  # a batch the mesh or the processes cannot split (names the key)
      raise ConfigError(str(e)) from e
    ck = config.checkpoint
    self.checkpoints = checkpoint.TrainCheckpointer(
        self.workdir / checkpoint.TRAIN_CHECKPOINT_DIR, keep=ck.keep, keep_every=ck.keep_every,
        async_save=ck.async_save)
    self.recorder = hooks_lib.StepMetrics(
        _inverse_peak_flops(), config.data.batch_size * config.train.seq_len,
        flops.train_flops_per_token(self.model_cfg, config.train.seq_len),
        config.train.non_finite, config.train.max_skipped_in_a_row)
    self.state: TrainState | None = None
    self.step_count = 0
    # Set by SIGTERM during train(); the loop saves and returns after the current step
    # (long hooks, e.g. a rollout, may check it too).
    self.stop_requested = threading.Event()
    # Checkpoints only at multiples of this step (GRPO's rollout cycles: trainers/rollout_cycle).
    self.checkpoint_period = 1
    self.writer: MetricsWriter | None = None  # open during train()
    self.summary: dict[str, Any] = {}
    self.hooks = self._make_hooks()

  def _make_hooks(self) -> list[hooks_lib.Hook]:
    c, h = self.config, hooks_lib
    built_in = [h.LogMetrics, *([h.Evaluate] if c.eval.every and c.eval.sources else []),
                *([h.EvaluateTasks] if c.eval.every and c.eval.tasks else []),
                *([h.Samples] if c.samples.every else []), h.SaveCheckpoint]
    return [make(self) for make in (*self.task.hooks, *built_in)]

  # -- state ---------------------------------------------------------------------------------

  def init_state(self) -> str:
    """Resume from the newest checkpoint in the workdir, else start from config.init_from or
    a random init. Returns where the state came from."""
    seed = self.config.train.seed
    state = self.checkpoints.restore_latest(self.layout.abstract, self.data)
    if state is not None:
      self.state = self._with_frozen(state)
      source = f"resumed from checkpoint step {int(state.step)}"
    elif self.config.init_from:
      self.state = self.layout.init(seed, self.base_params())
      source = f"params from {self.config.init_from}"
    else:
      self.state, source = self.layout.init(seed), "random init"
    self.step_count = int(self.state.step)
    return source

  def restore(self, step: int) -> None:
    """Load checkpoint `step` (any mesh: arrays are resharded to this trainer's layout)."""
    self.state = self._with_frozen(self.checkpoints.restore(step, self.layout.abstract,
                                                            self.data))
    self.step_count = int(self.state.step)

  def _with_frozen(self, state: TrainState) -> TrainState:
    """A restored state with its frozen part (checkpoints hold only what trains: a LoRA run's
    base is rebuilt as at step 0)."""
    if self.layout.abstract.frozen is None:
      return state
    return state.replace(frozen=self.layout.initial("frozen", self.config.train.seed,
                                                    self.base_params()))

  def base_params(self) -> dict | None:
    """config.init_from's parameters on the mesh (None without one): what the run starts
    from, and a restored LoRA run's base."""
    directory = self.config.init_from
    if not directory:
      return None
    numerics = {k: getattr(self.model_cfg, k) for k in NUMERICS_FIELDS}
    try:
      return model_dir.load_params(directory, self.layout.base_abstract, self.mesh, **numerics)
    except ValueError as e:
      raise ConfigError(f"config.init_from={directory!r}: {e} (config.model, preset "
                        f"{self.config.model.preset!r})") from e

  # -- the loop --------------------------------------------------------------------------------

  def step(self) -> dict[str, jax.Array]:
    """One optimizer step on the next batch (after the hooks' before_step); returns the
    step's metrics (device arrays, and hooks' host floats)."""
    position = self.data.get_state()
    try:
      batch = next(self.data)
      for hook in self.hooks:
        batch = hook.before_step(self, batch)
    except Exception:
      self.data.set_state(position)  # a save on the way out pairs the state with its data
      raise
    self.state, metrics = self._train_step(self.state, {k: batch[k] for k in self.task.batch_keys})
    self.step_count += 1
    return {**metrics, **batch.get("metrics", {})}

  def save(self) -> None:
    self.checkpoints.save(self.state, self.data)

  def report(self, metrics: dict[str, float], eta: float | None = None) -> None:
    """Write metrics at the current step (process 0) and keep them for the run's summary."""
    self.writer.write(self.step_count, metrics, eta)
    self.summary.update(metrics)

  def train(self) -> dict[str, Any]:
    """Run to config.train.steps (or SIGTERM); returns a summary of the last metrics."""
    log_cfg = self.config.logging
    self.writer = MetricsWriter(self.workdir, self.config.train.steps, console=log_cfg.console,
                                jsonl=log_cfg.jsonl, tensorboard=log_cfg.tensorboard,
                                enabled=self.is_main)
    try:
      with jax.set_mesh(self.mesh), _on_sigterm(self.stop_requested.set):
        self.writer.info(self._banner(self.init_state()))
        try:
          self._run()
        except Exception as e:
          self._save_before_stopping(e)
          raise
    finally:
      self.checkpoints.wait()
      self.checkpoints.close()
      self.writer.close()
    return {**self.summary, "step": self.step_count,
            "skipped_steps_total": self.recorder.skipped_total}

  def _run(self) -> None:
    steps, first = self.config.train.steps, self.step_count + 1
    self.summary["stopped_by"] = None
    while self.step_count < steps:
      metrics = self.step()
      self.recorder.add(self.step_count, metrics)
      if self.step_count == first:  # compilation: time it apart
        self.recorder.flush()
        self.writer.info(f"first step (compilation included) took "
                         f"{self.recorder.restart_clock():.1f}s")
      stopping = self._stopping()
      due = [h for h in self.hooks if h.due(self.step_count, self.step_count == steps, stopping)]
      if due:
        self.recorder.flush()
        for hook in due:
          hook.run(self)
        self.recorder.restart_clock()
      if stopping:
        self.checkpoints.wait()
        self.writer.info(f"SIGTERM: saved checkpoint step {self.step_count}; exiting")
        self.summary["stopped_by"] = "SIGTERM"
        return

  def _save_before_stopping(self, error: Exception) -> None:
    """Save the state before `error` ends the run (a bad record, diverged steps, a hook's
    error), when that is safe: the state was not lost with a failed step, and every process
    stops with the error (one process alone cannot take part in a save)."""
    collective = jax.process_count() == 1 or isinstance(error, hooks_lib.NonFiniteError)
    alive = not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.state)
                    if isinstance(leaf, jax.Array))
    if self.state is None or self.step_count == 0 or not (collective and alive):
      return  # (at step 0 there is no progress to keep)
    if self.step_count % self.checkpoint_period:
      error.add_note(f"(step {self.step_count} is inside a rollout cycle, which resumes only "
                     "from its start: the newest checkpoint is the run's last)")
      return
    try:
      self.checkpoints.wait()
      if self.step_count not in self.checkpoints.steps():
        self.save()
        self.checkpoints.wait()
    except Exception as e:  # noqa: BLE001 -- report the error that ended the run, not this
      error.add_note(f"(saving checkpoint step {self.step_count} failed too: {e})")
      return
    error.add_note(f"(checkpoint step {self.step_count} is saved: rerunning resumes from it)")

  def _stopping(self) -> bool:
    """A stop was asked for; with several processes JAX's preemption service makes every
    process stop at the same step."""
    if jax.process_count() > 1 and self.checkpoints.reached_preemption(self.step_count):
      self.stop_requested.set()
    return self.stop_requested.is_set()

  def _banner(self, source: str) -> str:
    c, cfg = self.config, self.model_cfg
    devices = jax.devices()
    text = (f"{self.task.name}: {cfg.name} ({param_count(cfg):,} params, {cfg.dtype} compute) "
            f"on mesh {dict(self.mesh.shape)} of {len(devices)} {devices[0].device_kind} "
            f"device(s); batch {c.train.global_batch_size} x {c.train.seq_len} tokens; "
            f"{source}; step {self.step_count}/{c.train.steps}; workdir {self.workdir}")
    if self.lora is not None:
      trainable = sum(a.size for a in jax.tree.leaves(self.layout.abstract.params))
      base = self.lora.quantize or cfg.param_dtype
      text += (f"; LoRA rank {self.lora.rank} on {','.join(self.lora.targets)}: "
               f"{trainable:,} trainable params, frozen base in {base}")
    return text


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, task: Task) -> dict:
  return Trainer(config, workdir, task).train()


def _validate(config: ml_collections.ConfigDict, task: Task) -> ModelConfig:
  model_cfg = validate(config, jax.device_count())
  if config.data.format != task.data_format:
    raise ConfigError(f"config.data.format={config.data.format!r}, but the {task.name} "
                      f"trainer reads {task.data_format!r} data")
  return model_cfg


def _inverse_peak_flops() -> float | None:
  """1 / (peak FLOP/s of all devices), or None when the device's peak is unknown."""
  peak = peak_flops_per_device(jax.devices()[0])
  return 1 / (peak * jax.device_count()) if peak else None


@contextlib.contextmanager
def _on_sigterm(callback: Callable[[], None]) -> Iterator[None]:
  """Run `callback` on SIGTERM inside the block. Single process, main thread only: with
  several processes, JAX's preemption service owns SIGTERM and orbax's reached_preemption
  agrees on the step to stop at (on CPU too: launch.local forwards SIGTERM to every process,
  and a SIGTERM to any one host stops them all at the same step)."""
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: callback())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
