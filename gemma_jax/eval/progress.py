"""A one-line progress bar with rate and ETA on stderr, redrawn at most twice a second."""

from __future__ import annotations

import sys
import time

from gemma_jax.metrics import format_duration


class Progress:
  def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
    self.total, self.label, self.enabled = total, label, enabled
    self.stream = stream or sys.stderr
    self.done, self.start, self.drawn = 0, time.perf_counter(), 0.0

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.enabled and (now - self.drawn >= 0.5 or self.done >= self.total):
      self.drawn = now
      self.stream.write("\r" + self.line(now - self.start))
      self.stream.flush()

  def line(self, elapsed: float) -> str:
    width = 24
    filled = width * self.done // max(self.total, 1)
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate else None
    return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
            f" {rate:.1f}/s ETA {format_duration(eta) if eta is not None else '?'}")

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()
