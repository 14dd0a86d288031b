"""Training metrics: peak FLOP/s per device (for MFU) and the sinks a run writes to.

MFU = model FLOPs per second (gemma_jax.flops: 6N + attention per token) / (peak FLOP/s per
device x devices). Accelerator peaks are the dense bf16 figures of the data sheets, looked up
by `device.device_kind`; a CPU has no data sheet, so its peak is measured once with a large
float32 matmul on one device (which uses every core) and cached in
~/.cache/gemma_jax/peak_flops.json. Emulated CPU devices share the cores: each is given
1/N of the measured peak.

Sinks: a console line per log step with a progress bar and ETA, `metrics.jsonl` (one JSON
object per log step), and TensorBoard event files under `tensorboard/` written with
tensorboardX (a small pure-Python writer: no TensorFlow or torch needed).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, by device_kind prefix (longest match wins).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,       # v5p
    "TPU v6 lite": 918e12,  # v6e
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma_jax"


def measure_matmul_flops(n: int = 2048, repeats: int = 5, device=None) -> float:
  """Best FLOP/s of an n x n float32 matmul on one device."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


@functools.cache
def cpu_peak_flops() -> float:
  """The whole host's measured matmul FLOP/s, cached on disk per CPU model and core count."""
  key = f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}"
  path = _CACHE / "peak_flops.json"
  try:
    cache = json.loads(path.read_text())
  except (OSError, ValueError):
    cache = {}
  if key not in cache:
    cache[key] = measure_matmul_flops(device=jax.local_devices(backend="cpu")[0])
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(cache, indent=2) + "\n")
    except OSError as e:
      log.warning("cannot cache the CPU peak in %s: %s", path, e)
  return cache[key]


def peak_flops_per_device(device) -> float | None:
  """Peak FLOP/s of one device; None for an unknown accelerator (MFU is then not reported)."""
  if device.platform == "cpu":
    return cpu_peak_flops() / len(jax.local_devices(backend="cpu"))
  matches = [k for k in PEAK_FLOPS if device.device_kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
  """Console progress, metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str | os.PathLike, total_steps: int, *, console: bool = True,
               jsonl: bool = True, tensorboard: bool = True, enabled: bool = True):
    self._total = total_steps
    self._console = console and enabled
    self._jsonl = open(Path(workdir) / METRICS_FILE, "a") if jsonl and enabled else None
    self._tb = _tensorboard_writer(Path(workdir) / TENSORBOARD_DIR) if tensorboard and enabled \
        else None

  def write(self, step: int, metrics: dict[str, float], eta_seconds: float | None = None) -> None:
    if self._jsonl:
      finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no NaN
      self._jsonl.write(json.dumps({"step": step, **finite}) + "\n")
      self._jsonl.flush()
    if self._tb:
      for name, value in metrics.items():
        if math.isfinite(value):
          self._tb.add_scalar(name, value, step)
      self._tb.flush()
    if self._console:
      print(self._line(step, metrics, eta_seconds), flush=True)

  def info(self, message: str) -> None:
    if self._console:
      print(message, flush=True)

  def _line(self, step: int, m: dict[str, float], eta: float | None) -> str:
    done = step / self._total
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    parts = [f"step {step:>{len(str(self._total))}}/{self._total} [{bar}] {done:4.0%}"]
    fmt = {"loss": "loss {:.4f}", "perplexity": "ppl {:.6g}", "eval_loss": "eval_loss {:.4f}",
           "eval_perplexity": "eval_ppl {:.6g}", "grad_norm": "gnorm {:.3f}",
           "learning_rate": "lr {:.2e}", "tokens_per_s": "tok/s {:,.0f}",
           "step_time_s": "step {:.3f}s", "mfu": "mfu {:.1%}", "skipped_steps": "skipped {:.0f}",
           # reward model and RLHF runs
           "accuracy": "acc {:.3f}", "eval_accuracy": "eval_acc {:.3f}",
           "reward_mean": "reward {:.3f}", "kl": "kl {:.2f}"}
    parts += [f.format(m[k]) for k, f in fmt.items() if k in m and (k != "skipped_steps" or m[k])]
    if eta is not None:
      parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _tensorboard_writer(directory: Path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    log.warning("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")
    return None
  return SummaryWriter(str(directory), flush_secs=30)
