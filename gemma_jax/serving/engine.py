"""Serving engines: a worker thread that generates for requests taken from a bounded queue.

`BaseEngine` holds what both engines share: the bounded queue (full -> QueueFull, which the
server turns into 503), the worker thread and the Job a request is. Two engines build on it:

- `ContinuousEngine` (gemma_jax/serving/continuous.py, the default): fixed decode slots that
  requests join and leave at every step.
- `Engine`, the static batcher here: the worker takes the first waiting request, gathers
  whatever else arrives within `batch_wait_s` (up to `max_batch` rows) and generates for all
  of them in one sampler call. A batch runs to completion before the next starts (no joining
  mid-generation; a cancelled request's rows run on, their deltas dropped).
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
  """One request: its rows and where to send their deltas (called on the worker thread).

  `cancel()` (any thread) asks the engine to drop it: a waiting job is skipped, a running one
  leaves its slots at the next step (continuous engine) and gets no more deltas."""

  prompts: list[list[int]]
  params: list[SamplingParams]
  on_delta: Callable[[Delta], None]
  on_error: Callable[[Exception], None]
  cancelled: bool = False

  def cancel(self) -> None:
    self.cancelled = True


class BaseEngine:
  """The queue and worker thread; subclasses implement `_loop` (run until `_stop` is set)."""

  def __init__(self, sampler: Sampler, *, max_batch: int = 16, max_queue: int = 64):
    if max_batch <= 0 or max_queue <= 0:
      raise ValueError(f"max_batch and max_queue must be positive, got {max_batch}, {max_queue}")
    self.sampler, self.max_batch = sampler, max_batch
    self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="gemma-engine", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._thread.join(timeout)

  @property
  def context(self) -> int:
    """The most tokens (prompt + new) one row may have."""
    return self.sampler.config.max_seq_len

  @property
  def waiting(self) -> int:
    """Requests in the queue (not yet started)."""
    return self._queue.qsize()

  @property
  def active(self) -> int:
    """Rows being generated now."""
    return 0

  def warm_up(self) -> int:
    """Compile ahead what serving runs, before start(); the number of shapes compiled (0: this
    engine compiles as requests come)."""
    return 0

  def submit(self, job: Job) -> None:
    if not 0 < len(job.prompts) <= self.max_batch:
      raise ValueError(f"a request must have 1 to {self.max_batch} prompts, "
                       f"got {len(job.prompts)}")
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting)") from None

  def _next_job(self, timeout: float) -> Job | None:
    """The next waiting job that is not cancelled (None after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
      try:
        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        return None
      if not job.cancelled:
        return job

  def _loop(self) -> None:
    raise NotImplementedError


class Engine(BaseEngine):
  """The static batcher: requests arriving within batch_wait_s are generated as one batch."""

  def __init__(self, sampler: Sampler, *, max_batch: int = 16, max_queue: int = 64,
               batch_wait_s: float = 0.01):
    super().__init__(sampler, max_batch=max_batch, max_queue=max_queue)
    self.batch_wait_s = batch_wait_s
    self._held: Job | None = None  # taken from the queue but too big for the last batch
    self._rows = 0

  @property
  def active(self) -> int:
    return self._rows

  def _loop(self) -> None:
    while not self._stop.is_set():
      jobs = self._gather()
      if jobs:
        self._run(jobs)

  def _gather(self) -> list[Job]:
    """The next batch: the first waiting job plus those arriving within batch_wait_s."""
    first, self._held = self._held, None
    if first is None:
      first = self._next_job(0.1)
      if first is None:
        return []
    jobs, rows = [first], len(first.prompts)
    deadline = time.monotonic() + self.batch_wait_s
    while rows < self.max_batch:
      job = self._next_job(max(0.0, deadline - time.monotonic()))
      if job is None:
        break
      if rows + len(job.prompts) > self.max_batch:
        self._held = job
        break
      jobs.append(job)
      rows += len(job.prompts)
    return jobs

  def _run(self, jobs: list[Job]) -> None:
    owners = [(job, row) for job in jobs for row in range(len(job.prompts))]
    self._rows = len(owners)
    try:
      for deltas in self.sampler.stream([p for job in jobs for p in job.prompts],
                                        [p for job in jobs for p in job.params]):
        for delta in deltas:
          job, row = owners[delta.row]
          if not job.cancelled:
            job.on_delta(dataclasses.replace(delta, row=row))
    except Exception as e:  # reported to every request of the batch; the engine keeps going
      for job in jobs:
        job.on_error(e)
    finally:
      self._rows = 0
