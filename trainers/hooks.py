"""Periodic work of the training loop, as hooks with their own intervals.

A hook's `run(trainer)` is called at the steps where it is due: every `every` steps (0 =
never) and at the last step, and with `on_stop` also at the step where a stop request
(SIGTERM, preemption) ends the run. `before_step(trainer, batch)` sees every batch before the
step trains on it and returns the batch to train on (RLHF's rollouts); a "metrics" entry of
host floats joins the step's metrics; `before_eval(trainer, batch)` completes evaluation
batches likewise (DPO's reference log-probs). Hooks run in list order: the task's own, then
logging, evaluation, samples and checkpointing. `StepMetrics` reads every step's metrics one step
late, so that the host never waits for the device in between.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from configs.base import eval_data_config
from gemma_jax.data import make_iterator
from gemma_jax.eval import Evaluator, load_task
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.train_step import jit_eval_step

if TYPE_CHECKING:
  from trainers.loop import Trainer

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"  # config.samples' generations, one JSON object per line


class Hook:
  """Work around the steps of a run (see the module docstring); override what you need."""

  every: int = 0
  on_stop: bool = False

  def due(self, step: int, last: bool, stopping: bool) -> bool:
    return bool(self.every) and (step % self.every == 0 or last or (stopping and self.on_stop))

  def before_step(self, trainer: Trainer, batch: dict) -> dict:
    return batch

  def before_eval(self, trainer: Trainer, batch: dict) -> dict:
    """An evaluation batch, completed like before_step's (DPO: the reference log-probs)."""
    return batch

  def run(self, trainer: Trainer) -> None:
    pass


HookFactory = Callable[["Trainer"], Hook]  # called once per Trainer, with the trainer


def before_step(fn: Callable[[Trainer, dict], dict]) -> HookFactory:
  """A hook factory for a plain function (trainer, batch) -> batch run before every step."""

  class BeforeStep(Hook):
    def before_step(self, trainer, batch):
      return fn(trainer, batch)

  return lambda trainer: BeforeStep()


class LogMetrics(Hook):
  """The window's step metrics (loss, grad norm, tokens/s, MFU, ...) every logging.every
  steps, at the end and when stopping."""

  on_stop = True

  def __init__(self, trainer: Trainer):
    self.every = trainer.config.logging.every

  def run(self, trainer: Trainer) -> None:
    remaining = trainer.config.train.steps - trainer.step_count
    metrics = trainer.recorder.summary(trainer.data.skipped_records)
    metrics.update(trainer.data.source_metrics())  # data_tokens/NAME, data_epochs/NAME
    trainer.report(metrics, trainer.recorder.eta(remaining))


class Evaluate(Hook):
  """Token-weighted loss (and the loss's extras) over the same first eval.batches batches
  of eval.sources every eval.every steps and at the end."""

  def __init__(self, trainer: Trainer):
    c = trainer.config
    self.every, self.batches = c.eval.every, c.eval.batches
    self.keys = trainer.task.batch_keys
    self.data = make_iterator(eval_data_config(c), trainer.tokenizer, trainer.mesh)
    self.start = self.data.get_state()
    self.step = jit_eval_step(trainer.layout, trainer.loss_fn, self.keys)

  def run(self, trainer: Trainer) -> None:
    def prepare(batch):
      for hook in trainer.hooks:
        batch = hook.before_eval(trainer, batch)
      return batch

    trainer.report(self.evaluate(trainer.state.model_params(), prepare))

  def evaluate(self, params: dict, prepare: Callable[[dict], dict] = lambda batch: batch
               ) -> dict[str, float]:
    self.data.set_state(self.start)
    total = weight = 0.0
    extras: dict[str, float] = {}
    for _ in range(self.batches):
      batch = prepare(next(self.data))
      s, w, e = self.step(params, {k: batch[k] for k in self.keys})
      total, weight = total + s, weight + w
      extras = {k: extras.get(k, 0.0) + float(v) for k, v in e.items()}
    loss = float(total) / max(float(weight), 1.0)
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss),
            **{f"eval_{k}": v / max(float(weight), 1.0) for k, v in extras.items()}}


class EvaluateTasks(Hook):
  """config.eval.tasks (gemma_jax.eval: perplexity, multiple choice, generation) on the
  current weights, on the trainer's mesh, every eval.every steps and at the end; each
  metric logged as eval_<task>_<metric> beside the held-out loss."""

  def __init__(self, trainer: Trainer):
    c = trainer.config
    if jax.process_count() > 1:  # the scorer reads whole result arrays on one host
      raise ValueError("config.eval.tasks runs on one host only; evaluate the workdir with "
                       "python -m gemma_jax.eval instead")
    self.every, self.limit = c.eval.every, c.eval.task_limit
    self.tasks = [load_task(t) for t in c.eval.tasks]

  def run(self, trainer: Trainer) -> None:
    c = trainer.config
    evaluator = Evaluator(trainer.layout.model(trainer.state.model_params()),
                          trainer.tokenizer, trainer.mesh, max_length=c.train.seq_len,
                          batch_size=c.data.batch_size, progress=False)
    trainer.report({f"eval_{task.name}_{name}": value for task in self.tasks
                    for name, value in evaluator.run(task, self.limit).items()
                    if name != "examples"})


class Samples(Hook):
  """Generations for config.samples.prompts from the current weights (the whole model: a
  LoRA run's adapters and base), on the trainer's mesh, to the console and
  WORKDIR/samples.jsonl (process 0) every samples.every steps and at the end."""

  def __init__(self, trainer: Trainer):
    s, tok = trainer.config.samples, trainer.tokenizer
    self.every, self.prompts = s.every, s.prompts
    self.ids = [tok.encode_chat([{"role": "user", "content": p}]) if s.chat
                else tok.encode(p, add_bos=True) for p in s.prompts]

  def run(self, trainer: Trainer) -> None:
    s, step = trainer.config.samples, trainer.step_count
    sampler = Sampler(trainer.layout.model(trainer.state.model_params()), trainer.tokenizer,
                      mesh=trainer.mesh)
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=float(s.temperature),
                            seed=step % 2**32)
    completions = sampler.generate(self.ids, params)
    if not trainer.is_main:
      return
    with open(trainer.workdir / SAMPLES_FILE, "a") as f:
      for prompt, c in zip(self.prompts, completions):
        trainer.writer.info(f"sample (step {step}): {prompt!r} -> {c.text!r}")
        f.write(json.dumps({"step": step, "prompt": prompt, "completion": c.text,
                            "finish_reason": c.finish_reason}) + "\n")


class SaveCheckpoint(Hook):
  """A checkpoint every checkpoint.every steps, at the end and when stopping."""

  on_stop = True

  def __init__(self, trainer: Trainer):
    self.every = trainer.config.checkpoint.every

  def run(self, trainer: Trainer) -> None:
    trainer.save()


class NonFiniteError(RuntimeError):
  """Non-finite steps that end the run: one with train.non_finite='stop', or
  train.max_skipped_in_a_row of them in a row."""


def report_non_finite(step: int, metrics: dict[str, float], policy: str, in_a_row: int,
                      limit: int) -> None:
  """Warn about a skipped step, naming the values that were not finite; raise
  NonFiniteError with policy 'stop' or at the limit of skipped steps in a row."""
  values = {"loss": metrics["loss"], "gradient norm": metrics["grad_norm"]}
  bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
  good = [f"{name} {value:.6g}" for name, value in values.items() if math.isfinite(value)]
  message = f"step {step}: non-finite {' and '.join(bad)}" + \
            (f" ({', '.join(good)})" if good else "") + "; the update was skipped"
  log.warning(message)
  if policy == "stop":
    raise NonFiniteError(f"{message}; stopping (config.train.non_finite='stop')")
  if limit and in_a_row >= limit:
    raise NonFiniteError(f"{message}; {in_a_row} steps in a row were skipped "
                         f"(config.train.max_skipped_in_a_row={limit}): the run diverged, "
                         "e.g. a learning rate too high for it")


_STEP_METRICS = {"loss", "tokens", "grad_norm", "learning_rate", "skipped"}


class StepMetrics:
  """Every step's metrics, read one step late; summarised (and timed) per logging window."""

  def __init__(self, inverse_peak: float | None, tokens_per_step: int, flops_per_token: float,
               non_finite: str, max_skipped_in_a_row: int = 0):
    self._inverse_peak, self._non_finite = inverse_peak, non_finite
    self._max_skipped_in_a_row, self._skipped_in_a_row = max_skipped_in_a_row, 0
    self._tokens_per_step, self._flops_per_token = tokens_per_step, flops_per_token
    self._pending: tuple[int, dict] | None = None
    self._steps: list[dict[str, float]] = []
    self._timed, self._start, self._step_time = 0, time.perf_counter(), None
    self.skipped_total = 0

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    """Take this step's (device) metrics; the previous step's are read now."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Read the pending step's metrics (a sync point: the device has finished it)."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self._steps.append(host)
    self._timed += 1
    self._skipped_in_a_row = self._skipped_in_a_row + 1 if host["skipped"] else 0
    if host["skipped"]:
      self.skipped_total += 1
      report_non_finite(step, host, self._non_finite, self._skipped_in_a_row,
                        self._max_skipped_in_a_row)

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
    out = {"loss": loss, "perplexity": perplexity(loss),
           "grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else math.nan,
           "learning_rate": self._steps[-1]["learning_rate"], "target_tokens": tokens,
           "skipped_steps": float(len(self._steps) - len(good)),
           "data_skipped_records": float(data_skipped_records)}
    # A task's own metrics (loss extras, a hook's): weighted like the loss, over the steps
    # that report them.
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


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan
