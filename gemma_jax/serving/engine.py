"""Batching engine: one worker thread runs the sampler over requests that arrive together.

Requests wait in a bounded queue (full -> QueueFull, which the server turns into 503). The
worker takes the first waiting request, then gathers whatever else arrives within
`batch_wait_s` (up to `max_batch` rows) and generates for all of them in one sampler call,
handing each request its own deltas through callbacks. A batch runs to completion before
the next starts (no joining mid-generation).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable

from gemma_jax.sampler import Delta, Sampler, SamplingParams


class QueueFull(Exception):
  """The request queue is at capacity."""


@dataclasses.dataclass
class Job:
  """One request: its rows and where to send their deltas (called on the worker thread)."""

  prompts: list[list[int]]
  params: list[SamplingParams]
  on_delta: Callable[[Delta], None]
  on_error: Callable[[Exception], None]


class Engine:

  def __init__(self, sampler: Sampler, *, max_batch: int = 16, max_queue: int = 64,
               batch_wait_s: float = 0.01):
    if max_batch <= 0 or max_queue <= 0:
      raise ValueError(f"max_batch and max_queue must be positive, got {max_batch}, {max_queue}")
    self.sampler, self.max_batch, self.batch_wait_s = sampler, max_batch, batch_wait_s
    self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
    self._held: Job | None = None  # taken from the queue but too big for the last batch
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="gemma-engine", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._thread.join(timeout)

  @property
  def waiting(self) -> int:
    return self._queue.qsize()

  def submit(self, job: Job) -> None:
    if not 0 < len(job.prompts) <= self.max_batch:
      raise ValueError(f"a request must have 1 to {self.max_batch} prompts, "
                       f"got {len(job.prompts)}")
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting)") from None

  def _loop(self) -> None:
    while not self._stop.is_set():
      jobs = self._gather()
      if jobs:
        self._run(jobs)

  def _gather(self) -> list[Job]:
    """The next batch: the first waiting job plus those arriving within batch_wait_s."""
    first, self._held = self._held, None
    if first is None:
      try:
        first = self._queue.get(timeout=0.1)
      except queue.Empty:
        return []
    jobs, rows = [first], len(first.prompts)
    deadline = time.monotonic() + self.batch_wait_s
    while rows < self.max_batch:
      try:
        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if rows + len(job.prompts) > self.max_batch:
        self._held = job
        break
      jobs.append(job)
      rows += len(job.prompts)
    return jobs

  def _run(self, jobs: list[Job]) -> None:
    owners = [(job, row) for job in jobs for row in range(len(job.prompts))]
    try:
      for deltas in self.sampler.stream([p for job in jobs for p in job.prompts],
                                        [p for job in jobs for p in job.params]):
        for delta in deltas:
          job, row = owners[delta.row]
          job.on_delta(dataclasses.replace(delta, row=row))
    except Exception as e:  # reported to every request of the batch; the engine keeps going
      for job in jobs:
        job.on_error(e)
