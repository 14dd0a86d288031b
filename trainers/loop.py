"""The one training loop: mesh -> sharded state -> data iterator -> jitted step -> metrics ->
eval every N steps -> checkpoint every N steps, at the end and on SIGTERM.

Trainers differ only by a `Task`; pretraining is `Task("pretrain", "pretrain", lm loss)`.
The extension points, and what the planned trainers put there:
  make_loss(config, mesh) -> loss_fn(model, batch, rng) -> (sum, weight) [, extras]
      pretrain and SFT: lm_loss (chat batches weight only model turns); reward model / DPO:
      a pairwise loss over the chosen_/rejected_ halves of preference batches. extras: a
      dict of further sums (e.g. correct pairs), reported divided by weight (eval: eval_*).
  make_model(model_config, seed) -> nnx.Module
      what the state's params are (default: a Transformer; the reward model adds a value
      head). With config.init_from, a model directory's params fill the paths they share
      with it; the rest keep their fresh init.
  data_format, batch_keys
      the config.data.format the task reads and the batch entries its step takes.
  setup(trainer)
      once, after the state is restored or initialised (RLHF: load the frozen reference and
      reward models onto trainer.mesh).
  prepare_batch(trainer, batch) -> batch
      before every step, with trainer.state at hand (RLHF's rollout phase: sample from
      trainer.state["params"] with the sampler on the same mesh, score, return the batch).
      A "metrics" entry of the returned batch (host floats) joins the step's metrics.

Workdir: config.json + tokenizer.model (what generate/serve load: the workdir is a model
directory, see gemma_jax.checkpoint.load_trainer_checkpoint), train_config.json (the job
config), checkpoints/<step>/ (orbax), metrics.jsonl, tensorboard/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from configs.base import ConfigError, eval_data_config, validate
from gemma_jax import checkpoint, distributed, flops, sharding
from gemma_jax import lora as lora_lib
from gemma_jax.config import ModelConfig
from gemma_jax.data import make_iterator
from gemma_jax.metrics import MetricsWriter, peak_flops_per_device
from gemma_jax.model import abstract_model, init_model, param_count
from gemma_jax.optim import make_optimizer
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece
from gemma_jax.train_step import (BATCH_KEYS, LossFn, ModelFn, abstract_train_state,
                                  init_train_state, jit_eval_step, jit_train_step, make_eval_step,
                                  make_train_step, model_graphdef, model_params)

log = logging.getLogger(__name__)

TRAIN_CONFIG_FILE = "train_config.json"
SAMPLES_FILE = "samples.jsonl"  # config.samples' generations, one JSON object per line
# ModelConfig fields that change numerics only: a workdir may be resumed with other values.
_NUMERICS_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class Task:
  """What one trainer adds to the loop (see the module docstring)."""
  name: str
  data_format: str
  make_loss: Callable[[ml_collections.ConfigDict, Mesh], LossFn]
  batch_keys: tuple[str, ...] = BATCH_KEYS
  setup: Callable[[Trainer], None] | None = None
  prepare_batch: Callable[[Trainer, dict], dict] | None = None
  make_model: ModelFn = init_model


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient with train.non_finite='stop'."""


class Trainer:
  """Everything a run needs, built from a validated config; `train()` runs the loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, task: Task):
    self.model_cfg: ModelConfig = validate(config, jax.device_count())
    if config.data.format != task.data_format:
      raise ConfigError(f"config.data.format={config.data.format!r}, but the {task.name} "
                        f"trainer reads {task.data_format!r} data")
    self.config, self.task = config, task
    self.workdir = Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.is_main = jax.process_index() == 0  # the one process that writes logs and configs
    distributed.check_shared_directory(self.workdir, "--workdir")  # multi-host checkpoints
    self.mesh = sharding.make_mesh(config.mesh)
    self.tokenizer = Tokenizer(_tokenizer_file(config.tokenizer, self.workdir))
    if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
      raise ConfigError(f"config.tokenizer: {self.tokenizer.vocab_size} pieces do not fit the "
                        f"model's vocab_size={self.model_cfg.vocab_size} (config.model)")
    if self.is_main:
      self._write_workdir_configs()
    self.optimizer, self.schedule = make_optimizer(config.optimizer, config.train.steps)
    # LoRA (config.lora.rank > 0): state["params"] = adapters, state["frozen"] = the base.
    self.lora = lora_lib.LoRAConfig.from_config(config.lora)
    if self.lora is not None and self.is_main:
      lora_lib.write_run_file(self.workdir, self.lora,
                              os.path.abspath(config.init_from) if config.init_from else "",
                              config.train.seed)
    self.abstract_state = abstract_train_state(self.model_cfg, self.optimizer, self.mesh,
                                               task.make_model, self.lora)
    self.shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    # The guard covers the weights (a LoRA run's frozen base): adapters are small, and a
    # factor that no mesh axis divides is left whole by design.
    weights = "frozen" if self.lora is not None else "params"
    sharding.check_replication(self.abstract_state[weights], self.shardings[weights],
                               config.sharding.max_replicated_fraction)
    graphdef = model_graphdef(self.model_cfg, task.make_model, self.lora)
    self.graphdef = graphdef  # merges with model_params(self.state) into the model
    loss_fn = task.make_loss(config, self.mesh)
    step = make_train_step(graphdef, self.optimizer, loss_fn, self.schedule,
                           config.train.microbatches)
    self._train_step = jit_train_step(step, self.shardings, self.mesh, task.batch_keys)
    self._eval_step = jit_eval_step(make_eval_step(graphdef, loss_fn),
                                    model_params(self.shardings), self.mesh, task.batch_keys)
    self.data = make_iterator(config.data, self.tokenizer, self.mesh)
    self._eval_data = (make_iterator(eval_data_config(config), self.tokenizer, self.mesh)
                       if config.eval.every else None)
    self._eval_start = self._eval_data.get_state() if self._eval_data else None
    ck = config.checkpoint
    self.checkpoints = checkpoint.TrainCheckpointer(
        self.workdir / checkpoint.TRAIN_CHECKPOINT_DIR, keep=ck.keep, keep_every=ck.keep_every,
        async_save=ck.async_save)
    self._inverse_peak = _inverse_peak_flops()  # before any mesh context: it may measure
    self.state: dict | None = None
    self.step_count = 0
    # Set by SIGTERM during train(); the loop saves and returns after the current step
    # (long hooks, e.g. a rollout, may check it too).
    self.stop_requested = threading.Event()

  # -- state ---------------------------------------------------------------------------------

  def init_state(self) -> str:
    """Resume from the newest checkpoint in the workdir, else start from config.init_from or
    a random init. Returns where the state came from."""
    state = self.checkpoints.restore_latest(self.abstract_state, self.data)
    if state is not None:
      source = f"resumed from checkpoint step {int(state['step'])}"
      if self.lora is not None:  # LoRA checkpoints hold the adapters only: rebuild the base
        state["frozen"] = self._fresh_state()["frozen"]
    elif self.config.init_from:
      state = self._state_from(self.config.init_from)
      source = f"params from {self.config.init_from}"
    else:
      state = self._fresh_state()
      source = "random init"
    self.state, self.step_count = state, int(state["step"])
    return source

  def _fresh_state(self) -> dict:
    """The state at step 0: from config.init_from, else the seeded random init."""
    if self.config.init_from:
      return self._state_from(self.config.init_from)
    return init_train_state(self.model_cfg, self.optimizer, self.mesh, self.config.train.seed,
                            self.task.make_model, self.lora)[0]

  def restore(self, step: int) -> None:
    """Load checkpoint `step` (any mesh: arrays are resharded to this trainer's layout)."""
    self.state = self.checkpoints.restore(step, self.abstract_state, self.data)
    if self.lora is not None:
      self.state["frozen"] = self._fresh_state()["frozen"]
    self.step_count = int(self.state["step"])

  def _base_layout(self) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, shardings) of the task model's whole parameter dict: what
    init_from is loaded into (a LoRA run's state holds it split into params and frozen)."""
    if self.lora is None:
      return self.abstract_state["params"], self.shardings["params"]
    model = nnx.eval_shape(lambda: self.task.make_model(self.model_cfg, 0))
    state = nnx.state(model, nnx.Param)
    return state.to_pure_dict(), sharding.param_shardings(state, self.mesh)

  def _state_from(self, directory: str) -> dict:
    abstract, shardings = self._base_layout()
    want = jax.tree.map(lambda a: a.shape, abstract)
    got = jax.tree.map(lambda a: a.shape, nnx.split(abstract_model(
        checkpoint.load_config(directory)))[1].to_pure_dict())
    if got != _pick(want, got):
      raise ConfigError(f"config.init_from={directory!r}: its parameters do not have the shapes "
                        f"of config.model (preset {self.config.model.preset!r})")
    numerics = {k: getattr(self.model_cfg, k) for k in _NUMERICS_FIELDS}
    _, model, _ = checkpoint.load_model_dir(directory, _pick(shardings, got), **numerics)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    seed = self.config.train.seed
    if got != want:  # e.g. a reward model's head: fresh, the rest from the directory
      fresh = jax.jit(lambda: nnx.state(self.task.make_model(self.model_cfg, seed),
                                        nnx.Param).to_pure_dict(),
                      out_shardings=shardings)()
      params = _overlay(fresh, params)
    if self.lora is not None:  # the loaded params become the frozen base (quantized if asked)
      return init_train_state(self.model_cfg, self.optimizer, self.mesh, seed,
                              self.task.make_model, self.lora, base=params)[0]
    start = lambda p: {"params": p, "opt_state": self.optimizer.init(p),
                       "step": jax.numpy.zeros((), jax.numpy.int32),
                       "rng": jax.random.key_data(jax.random.key(seed))}
    return jax.jit(start, out_shardings=self.shardings)(params)

  # -- one step, evaluation, checkpoint ------------------------------------------------------

  def step(self) -> dict[str, jax.Array]:
    """One optimizer step on the next batch; returns the step's metrics (device arrays)."""
    batch, host_metrics = next(self.data), {}
    if self.task.prepare_batch:
      batch = self.task.prepare_batch(self, batch)
      host_metrics = batch.get("metrics", {})
    self.state, metrics = self._train_step(self.state, {k: batch[k] for k in self.task.batch_keys})
    self.step_count += 1
    return {**metrics, **host_metrics}

  def evaluate(self) -> dict[str, float]:
    """Token-weighted loss (and the loss's extras) over the first eval.batches batches of
    eval.sources."""
    self._eval_data.set_state(self._eval_start)
    total = weight = 0.0
    extras: dict[str, float] = {}
    for _ in range(self.config.eval.batches):
      batch = next(self._eval_data)
      s, w, e = self._eval_step(model_params(self.state),
                                {k: batch[k] for k in self.task.batch_keys})
      total, weight = total + s, weight + w
      extras = {k: extras.get(k, 0.0) + float(v) for k, v in e.items()}
    loss = float(total) / max(float(weight), 1.0)
    return {"eval_loss": loss, "eval_perplexity": _perplexity(loss),
            **{f"eval_{k}": v / max(float(weight), 1.0) for k, v in extras.items()}}

  def save(self) -> None:
    self.checkpoints.save(self.state, self.data)

  def sample(self) -> list[dict[str, Any]]:
    """Generations for config.samples.prompts from the current weights (the whole model:
    adapters and base for LoRA), on the trainer's mesh."""
    s = self.config.samples
    model = nnx.merge(self.graphdef, nnx.State(model_params(self.state)))
    sampler = Sampler(model, self.tokenizer, mesh=self.mesh, batch_axes=("data", "fsdp"))
    prompts = [self.tokenizer.encode_chat([{"role": "user", "content": p}]) if s.chat
               else self.tokenizer.encode(p, add_bos=True) for p in s.prompts]
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=float(s.temperature),
                            seed=self.step_count % 2**32)
    return [{"step": self.step_count, "prompt": p, "completion": c.text,
             "finish_reason": c.finish_reason}
            for p, c in zip(s.prompts, sampler.generate(prompts, params))]

  # -- the loop --------------------------------------------------------------------------------

  def train(self) -> dict[str, Any]:
    """Run to config.train.steps (or SIGTERM); returns a summary of the last metrics."""
    c = self.config
    log_cfg = c.logging
    writer = MetricsWriter(self.workdir, c.train.steps, console=log_cfg.console,
                           jsonl=log_cfg.jsonl, tensorboard=log_cfg.tensorboard,
                           enabled=self.is_main)
    try:
      with jax.set_mesh(self.mesh), _on_sigterm(self.stop_requested.set):
        source = self.init_state()
        writer.info(self._banner(source))
        if self.task.setup:
          self.task.setup(self)
        return self._run(writer)
    finally:
      self.checkpoints.wait()
      self.checkpoints.close()
      writer.close()

  def _run(self, writer: MetricsWriter) -> dict[str, Any]:
    c, stop = self.config, self.stop_requested
    window = _Window(self._inverse_peak, c.data.batch_size * c.train.seq_len,
                     flops.train_flops_per_token(self.model_cfg, c.train.seq_len))
    summary: dict[str, Any] = {"step": self.step_count, "stopped_by": None,
                               "skipped_steps_total": 0}
    first, pending = self.step_count + 1, None
    while self.step_count < c.train.steps:
      metrics = self.step()
      if pending:  # the previous step's metrics, read once this one is dispatched
        self._record(window, *pending, summary)
      pending = (self.step_count, metrics)
      if self.step_count == first:  # compilation: time it apart
        self._record(window, *pending, summary)
        pending = None
        writer.info(f"first step (compilation included) took {window.restart_clock():.1f}s")
      if jax.process_count() > 1 and self.checkpoints.reached_preemption(self.step_count):
        stop.set()  # JAX's preemption service: every process stops at the same step
      if self._is_sync_point(stop.is_set()):
        if pending:
          self._record(window, *pending, summary)
          pending = None
        self._report_and_save(window, writer, summary, stop.is_set())
      if stop.is_set():
        self.checkpoints.wait()
        writer.info(f"SIGTERM: saved checkpoint step {self.step_count}; exiting")
        summary["stopped_by"] = "SIGTERM"
        break
    summary["step"] = self.step_count
    return summary

  def _is_sync_point(self, stopping: bool) -> bool:
    c, step = self.config, self.step_count
    return (stopping or step == c.train.steps or step % c.logging.every == 0
            or step % c.checkpoint.every == 0 or (c.eval.every and step % c.eval.every == 0)
            or (c.samples.every and step % c.samples.every == 0))

  def _report_and_save(self, window: _Window, writer: MetricsWriter, summary: dict,
                       stopping: bool) -> None:
    """Log, evaluate and checkpoint as due at this step (every metric is on the host)."""
    c, step = self.config, self.step_count
    last = step == c.train.steps
    if last or stopping or step % c.logging.every == 0:
      metrics = window.summary(self.data.skipped_records)
      writer.write(step, metrics, window.eta(c.train.steps - step))
      summary.update(metrics)
    if c.eval.every and (last or step % c.eval.every == 0):
      metrics = self.evaluate()
      writer.write(step, metrics)
      summary.update(metrics)
    if c.samples.every and (last or step % c.samples.every == 0):
      self._log_samples(writer)
    if last or stopping or step % c.checkpoint.every == 0:
      self.save()
    window.restart_clock()

  def _log_samples(self, writer: MetricsWriter) -> None:
    """config.samples' generations to the console and WORKDIR/samples.jsonl (process 0)."""
    samples = self.sample()
    if not self.is_main:
      return
    with open(self.workdir / SAMPLES_FILE, "a") as f:
      for s in samples:
        writer.info(f"sample (step {s['step']}): {s['prompt']!r} -> {s['completion']!r}")
        f.write(json.dumps(s) + "\n")

  def _record(self, window: _Window, step: int, metrics: dict, summary: dict) -> None:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    window.add(host)
    if host["skipped"]:
      summary["skipped_steps_total"] += 1
      report_non_finite(step, host, self.config.train.non_finite)

  # -- reporting -------------------------------------------------------------------------------

  def _banner(self, source: str) -> str:
    c, cfg = self.config, self.model_cfg
    devices = jax.devices()
    return (f"{self.task.name}: {cfg.name} ({param_count(cfg):,} params, {cfg.dtype} compute) "
            f"on mesh {dict(self.mesh.shape)} of {len(devices)} {devices[0].device_kind} "
            f"device(s); batch {c.train.global_batch_size} x {c.train.seq_len} tokens; "
            f"{source}; step {self.step_count}/{c.train.steps}; workdir {self.workdir}"
            + self._lora_banner())

  def _lora_banner(self) -> str:
    if self.lora is None:
      return ""
    trainable = sum(a.size for a in jax.tree.leaves(self.abstract_state["params"]))
    base = self.lora.quantize or self.model_cfg.param_dtype
    return (f"; LoRA rank {self.lora.rank} on {','.join(self.lora.targets)}: {trainable:,} "
            f"trainable params, frozen base in {base}")

  def _write_workdir_configs(self) -> None:
    """config.json (the ModelConfig, as in a model directory) and train_config.json; a workdir
    that already holds another model is refused."""
    path = self.workdir / checkpoint.CONFIG_FILE
    new = json.loads(json.dumps(dataclasses.asdict(self.model_cfg)))  # tuples as lists
    if path.is_file():
      old = json.loads(path.read_text())
      differ = sorted(k for k in new if k not in _NUMERICS_FIELDS and old.get(k) != new[k])
      if differ:
        raise ConfigError(f"config.model: the workdir {self.workdir} holds a model with other "
                          f"{differ} ({ {k: old.get(k) for k in differ} }); use a new --workdir")
    _write_atomic(path, json.dumps(new, indent=2) + "\n")
    _write_atomic(self.workdir / TRAIN_CONFIG_FILE, self.config.to_json_best_effort(indent=2))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, task: Task) -> dict:
  return Trainer(config, workdir, task).train()


def report_non_finite(step: int, metrics: dict[str, float], policy: str) -> None:
  """Warn about a skipped step; with policy 'stop' (config.train.non_finite) raise."""
  message = (f"step {step}: non-finite loss ({metrics['loss']}) or gradient norm "
             f"({metrics['grad_norm']}); the update was skipped")
  log.warning(message)
  if policy == "stop":
    raise NonFiniteError(f"{message}; stopping (config.train.non_finite='stop')")


_STEP_METRICS = {"loss", "tokens", "grad_norm", "learning_rate", "skipped"}


class _Window:
  """Per-step host metrics since the last report, summarised at each log step."""

  def __init__(self, inverse_peak: float | None, tokens_per_step: int, flops_per_token: float):
    self._inverse_peak = inverse_peak
    self._tokens_per_step = tokens_per_step
    self._flops_per_token = flops_per_token
    self._steps: list[dict[str, float]] = []
    self._timed = 0
    self._start = time.perf_counter()
    self._step_time: float | None = None

  def add(self, metrics: dict[str, float]) -> None:
    self._steps.append(metrics)
    self._timed += 1

  def restart_clock(self) -> float:
    """Time only the steps from now on (not compilation, evals, saves); returns the seconds
    since the last restart."""
    seconds = time.perf_counter() - self._start
    self._timed, self._start = 0, time.perf_counter()
    return seconds

  def summary(self, data_skipped_records: int) -> dict[str, float]:
    good = [m for m in self._steps if not m["skipped"]]
    tokens = sum(m["tokens"] for m in good)
    loss = sum(m["loss"] * m["tokens"] for m in good) / tokens if tokens else math.nan
    out = {"loss": loss, "perplexity": _perplexity(loss),
           "grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else math.nan,
           "learning_rate": self._steps[-1]["learning_rate"], "target_tokens": tokens,
           "skipped_steps": float(len(self._steps) - len(good)),
           "data_skipped_records": float(data_skipped_records)}
    # A task's own metrics (loss extras, prepare_batch's): weighted like the loss, over the
    # steps that report them.
    for key in sorted({k for m in good for k in m} - _STEP_METRICS):
      have = [m for m in good if key in m]
      weight = sum(m["tokens"] for m in have)
      out[key] = (sum(m[key] * m["tokens"] for m in have) / weight if weight else
                  float(np.mean([m[key] for m in have])))
    if self._timed:
      self._step_time = (time.perf_counter() - self._start) / self._timed
      tokens_per_s = self._tokens_per_step / self._step_time
      out.update(step_time_s=self._step_time, tokens_per_s=tokens_per_s)
      if self._inverse_peak:
        out["mfu"] = tokens_per_s * self._flops_per_token * self._inverse_peak
    self._steps = []
    return out

  def eta(self, remaining_steps: int) -> float | None:
    return remaining_steps * self._step_time if self._step_time else None


def _inverse_peak_flops() -> float | None:
  """1 / (peak FLOP/s of all devices), or None when the device's peak is unknown."""
  peak = peak_flops_per_device(jax.devices()[0])
  return 1 / (peak * jax.device_count()) if peak else None


def _perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan


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


def _tokenizer_file(tok: ml_collections.ConfigDict, workdir: Path) -> Path:
  """WORKDIR/tokenizer.model: a copy of tokenizer.path, or trained on tokenizer.train_corpus
  (once; a resumed run reuses it). With several processes, process 0 makes it and every
  process uses process 0's bytes, so all hosts tokenize alike."""
  target = workdir / checkpoint.TOKENIZER_FILE
  if jax.process_index() != 0:
    data = distributed.broadcast_bytes(None)
    if not target.is_file() or target.read_bytes() != data:
      _write_atomic(target, data)
    return target
  if tok.path:
    data = Path(tok.path).read_bytes()
    if not target.is_file() or target.read_bytes() != data:
      _write_atomic(target, data)
  elif not target.is_file():
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
      trained = train_sentencepiece(tok.train_corpus, Path(tmp) / "spm", tok.vocab_size)
      os.replace(trained, target)
  if jax.process_count() > 1:
    distributed.broadcast_bytes(target.read_bytes())
  return target


def _write_atomic(path: Path, data: str | bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)


def _pick(tree, like):
  """The part of nested dict `tree` at the paths of `like` (None where `tree` lacks one)."""
  if not isinstance(like, dict):
    return tree
  if not isinstance(tree, dict):
    return None
  return {k: _pick(tree[k], v) if k in tree else None for k, v in like.items()}


def _overlay(base, top):
  """`base` with the leaves that nested dict `top` has at the same paths replaced."""
  if not isinstance(top, dict):
    return top
  return {k: _overlay(v, top[k]) if k in top else v for k, v in base.items()}
