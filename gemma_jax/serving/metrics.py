"""Server metrics in the Prometheus text format (version 0.0.4), for `GET /metrics`.

Names follow vLLM and TGI in spirit, prefixed `gemma_`: requests by outcome, prompt and
generated tokens, queue depth and active rows (read from the engine when scraped), and
histograms of time to first token, time per output token (after the first, per request) and
request latency. Written by hand: a few counters need no dependency. Updated from the
server's event loop; a lock keeps a scrape consistent anyway.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OUTCOMES = ("ok", "error", "timeout", "cancelled", "rejected")


class Histogram:
  """Cumulative buckets, sum and count, as Prometheus histograms report them."""

  def __init__(self, bounds: tuple[float, ...]):
    self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
    self.sum = 0.0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.bounds, value)] += 1
    self.sum += value

  def lines(self, name: str) -> list[str]:
    out, total = [], 0
    for bound, count in zip((*map(_number, self.bounds), "+Inf"), self.counts):
      total += count
      out.append(f'{name}_bucket{{le="{bound}"}} {total}')
    return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


class Metrics:
  """The server's counters; `gauges` are read when scraped (name -> (help, read))."""

  def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
    self.gauges = gauges
    self.requests = dict.fromkeys(OUTCOMES, 0)
    self.prompt_tokens = self.generated_tokens = 0
    self.ttft = Histogram(LATENCY_BUCKETS)
    self.per_token = Histogram(TOKEN_BUCKETS)
    self.latency = Histogram(LATENCY_BUCKETS)
    self._lock = threading.Lock()

  def started(self, prompt_tokens: int) -> None:
    with self._lock:
      self.prompt_tokens += prompt_tokens

  def rejected(self) -> None:
    with self._lock:
      self.requests["rejected"] += 1

  def first_token(self, seconds: float) -> None:
    with self._lock:
      self.ttft.observe(seconds)

  def tokens(self, n: int) -> None:
    with self._lock:
      self.generated_tokens += n

  def finished(self, outcome: str, seconds: float, first: float | None, tokens: int) -> None:
    """A request ended `seconds` after it arrived, its first token at `first` seconds."""
    with self._lock:
      self.requests[outcome] += 1
      self.latency.observe(seconds)
      if first is not None and tokens > 1:
        self.per_token.observe((seconds - first) / (tokens - 1))

  def render(self) -> str:
    with self._lock:
      lines = _family("gemma_requests_total", "counter", "Requests by outcome.",
                      [f'gemma_requests_total{{outcome="{k}"}} {v}'
                       for k, v in self.requests.items()])
      lines += _family("gemma_prompt_tokens_total", "counter", "Prompt tokens of requests.",
                       [f"gemma_prompt_tokens_total {self.prompt_tokens}"])
      lines += _family("gemma_generation_tokens_total", "counter", "Tokens generated.",
                       [f"gemma_generation_tokens_total {self.generated_tokens}"])
      for name, (text, read) in self.gauges.items():
        lines += _family(name, "gauge", text, [f"{name} {_number(read())}"])
      for name, text, hist in [
          ("gemma_time_to_first_token_seconds", "From arrival to the first token.", self.ttft),
          ("gemma_time_per_output_token_seconds", "Per token after the first, per request.",
           self.per_token),
          ("gemma_request_latency_seconds", "From arrival to the end.", self.latency)]:
        lines += _family(name, "histogram", text, hist.lines(name))
    return "\n".join(lines) + "\n"


def _family(name: str, kind: str, text: str, samples: list[str]) -> list[str]:
  return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]


def _number(x: float) -> str:
  return repr(float(x)) if not float(x).is_integer() else str(int(x))
