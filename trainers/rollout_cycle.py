"""Several optimizer steps per rollout (GRPO) on the one loop: rollout cycles.

A cycle is updates_per_rollout x minibatches loop steps. Its first step samples and scores
the completions of a batch of prompts (the buffer); each of its steps trains on minibatch
(step % minibatches) of the buffer: rows r with r % minibatches == m, so each device keeps
its own rows. Every loop step stays one ordinary optimizer step (schedule, metrics,
microbatches, checkpoints unchanged).

Exact resume without storing the buffer: a buffer is a function of the policy at the
cycle's first step, the state's rng and the step (the rollout's seeds), so a checkpoint at
a cycle boundary reproduces it. Hence every checkpoint is at a boundary: checkpoint.every
and train.steps are multiples of the cycle (trainers/rlhf.py checks), and a stop request
(SIGTERM, preemption) takes effect at the end of the current cycle (`CycleStop`), at most
cycle - 1 steps later. Storing the buffer instead would put host-side arrays (tokens,
log-probs, advantages) outside the orbax state or widen the TrainState for one task.
The prompt data advance once per cycle (`CycleData`), so no batch is drawn and dropped.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any

import grain
import jax

from gemma_jax import sharding

if TYPE_CHECKING:
  from trainers.loop import Trainer


class CycleData(grain.DatasetIterator):
  """The trainer's data iterator, drawing a batch only at a cycle's first step (the other
  steps see the same batch again, unused); its state is the parent's."""

  def __init__(self, parent, trainer: Trainer, cycle: int):
    super().__init__(parent)
    self._trainer, self._cycle, self._last = trainer, cycle, None

  def __next__(self) -> dict[str, Any]:
    if self._last is None or self._trainer.step_count % self._cycle == 0:
      self._last = next(self._parent)
    return self._last

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state) -> None:
    self._parent.set_state(state)
    self._last = None

  @property
  def skipped_records(self) -> int:
    return self._parent.skipped_records

  def source_metrics(self) -> dict[str, float]:
    return self._parent.source_metrics()

  def record_positions(self) -> list[int]:
    return self._parent.record_positions()


class CycleStop:
  """trainer.stop_requested for cycles: set() as a threading.Event's, but is_set() only once
  the steps done fill whole cycles (see the module docstring)."""

  def __init__(self, trainer: Trainer, cycle: int):
    self._event, self._trainer, self._cycle = threading.Event(), trainer, cycle

  def set(self) -> None:
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set() and self._trainer.step_count % self._cycle == 0


def install(trainer: Trainer, cycle: int) -> None:
  """Make the trainer's data and stop requests follow cycles of `cycle` steps."""
  if cycle > 1:
    trainer.data = CycleData(trainer.data, trainer, cycle)
    trainer.stop_requested = CycleStop(trainer, cycle)
    trainer.checkpoint_period = cycle  # also for the save before an error ends the run


def minibatcher(mesh, count: int):
  """select(buffer, m) -> minibatch m of `count` of a buffer of global [N, ...] arrays, as
  global arrays split over the batch axes like any batch."""
  if count == 1:
    return lambda buffer, m: buffer

  @functools.partial(jax.jit, static_argnums=1, out_shardings=sharding.batch_sharding(mesh))
  def select(buffer, m):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:])[:, m],
                        buffer)

  return select
