"""One-GPU figures: gemma_2b train-step MFU (cudnn vs xla attention) and gemma3_1b decode
tokens/s against the HBM-bandwidth bound.

  python benchmarks/gpu.py [--tiny] [--steps 3] [--remat full] [--budget_s 450]
      [--json benchmarks/gpu.json]

Train: the trainer's step (benchmarks/train_throughput.py: RunLayout, jit_train_step,
lm_loss, AdamW), random weights, float32 params, bfloat16 compute, remat "full" so both
shapes fit one 80 GB GPU: batch 4 x 2,048 and 1 x 8,192 tokens, attention_impl "cudnn" and
"xla". MFU = gemma_jax.flops.train_flops_per_token x tokens / step s / peak bf16 FLOP/s
(data-sheet table by device_kind; elsewhere a measured matmul peak). Decode: the KV-cache
sampler as benchmarks/decode.py drives it, batch 1 and 64, bound = HBM bandwidth (table;
on CPU measured copy bandwidth) / (param bytes + KV-cache bytes) x batch. Each case
compiles first (untimed), then the best of --steps timed steps is kept; a failing case
(OOM, unsupported kernel) records its error and the run goes on. Cases past --budget_s are
skipped. On CPU (or with --tiny) the models are tiny_gemma1 / tiny_gemma3 at 4 x 128 and
1 x 256 tokens and the cudnn rows are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # GPU: room for gemma_2b

import jax  # noqa: E402
import numpy as np  # noqa: E402

_platforms = os.environ.get("JAX_PLATFORMS")
from benchmarks import train_throughput as tt  # noqa: E402  (it setdefaults JAX_PLATFORMS=cpu)

if _platforms is None:  # undo that: this benchmark uses the environment's platforms
  os.environ.pop("JAX_PLATFORMS", None)

from benchmarks.decode import copy_bandwidth, measure  # noqa: E402
from gemma_jax import sharding  # noqa: E402
from gemma_jax.config import get_config  # noqa: E402
from gemma_jax.losses import lm_loss  # noqa: E402
from gemma_jax.metrics import PEAK_FLOPS, measure_matmul_flops  # noqa: E402
from gemma_jax.model import init_model, param_count  # noqa: E402
from gemma_jax.optim import make_optimizer  # noqa: E402
from gemma_jax.sampler import Sampler, SamplingParams  # noqa: E402
from gemma_jax.train_state import RunLayout  # noqa: E402
from gemma_jax.train_step import jit_train_step  # noqa: E402

# HBM bandwidth in bytes/s by device_kind prefix (longest match wins), from the data sheets.
HBM_BANDWIDTH = {"NVIDIA H100": 3.35e12, "NVIDIA H100 PCIe": 2.0e12, "NVIDIA H200": 4.8e12,
                 "NVIDIA A100": 2.0e12}
FULL = dict(train_model="gemma_2b", train_shapes=[(4, 2048), (1, 8192)],
            decode_model="gemma3_1b", prompt_len=128, decode_steps=64, param_dtype="bfloat16")
TINY = dict(train_model="tiny_gemma1", train_shapes=[(4, 128), (1, 256)],
            decode_model="tiny_gemma3", prompt_len=16, decode_steps=16, param_dtype="float32")
DECODE_BATCHES = (1, 64)
IMPLS = ("cudnn", "xla")


def lookup(table: dict, device) -> float | None:
  matches = [k for k in table if device.device_kind.startswith(k)]
  return table[max(matches, key=len)] if matches else None


def device_copy_bandwidth(device, megabytes: int = 512, repeats: int = 5) -> float:
  """Bytes read + written per second by a jitted elementwise op on an unknown accelerator."""
  x = jax.device_put(np.ones(megabytes * 2**20 // 4, np.float32), device)
  double = jax.jit(lambda x: x * 2)
  jax.block_until_ready(double(x))
  best = min(_timed(lambda: double(x)) for _ in range(repeats))
  return 2 * x.nbytes / best


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def peaks(device) -> dict:
  """Peak bf16 FLOP/s and memory bandwidth, from the tables or measured, with their source."""
  flops, bandwidth = lookup(PEAK_FLOPS, device), lookup(HBM_BANDWIDTH, device)
  out = {"peak_flops_source": "table" if flops else "measured float32 matmul",
         "bandwidth_source": "table" if bandwidth else "measured copy"}
  if flops is None:
    flops = max(measure_matmul_flops(repeats=5, device=device) for _ in range(2))
  if bandwidth is None:
    bandwidth = (copy_bandwidth(256) if device.platform == "cpu"
                 else device_copy_bandwidth(device))
  return {"peak_flops_per_s": flops, "bandwidth_bytes_per_s": bandwidth, **out}


class TrainCase(tt.Case):
  """train_throughput's Case (same step and result) for any config and batch shape."""

  def __init__(self, cfg, batch_size: int, seq_len: int, mesh):
    self.cfg, self.shape = cfg, types.SimpleNamespace(batch_size=batch_size, seq_len=seq_len)
    self.row = {"params": param_count(cfg)}
    optimizer, schedule = make_optimizer(tt.OPTIMIZER, total_steps=1000)
    layout = RunLayout.build(cfg, optimizer, mesh)
    self.state = layout.init(seed=0)
    self.jitted = jit_train_step(layout, lm_loss, schedule)
    self.batches = [tt.batch(cfg, batch_size, seq_len, i) for i in range(2)]
    self.row["first_step_s"] = self.step(0)  # compiles
    self.times = []


def train_row(model: str, impl: str, batch_size: int, seq_len: int, args, mesh, peak) -> dict:
  row = {"kind": "train", "model": model, "attention_impl": impl, "batch_size": batch_size,
         "seq_len": seq_len, "remat": args.remat}
  cfg = get_config(model, dtype="bfloat16", param_dtype="float32", remat_policy=args.remat,
                   attention_impl=impl)
  case = TrainCase(cfg, batch_size, seq_len, mesh)
  case.times = [case.step(i + 1) for i in range(args.steps)]
  result = case.result(case.shape, peak)
  result["mfu"] = result.pop("fraction_of_peak")
  return {**row, **result}


def kv_cache_bytes(sampler: Sampler, batch: int, prompt_len: int, steps: int) -> int:
  """Bytes of the k and v cache the decode loop reads every step (all slots, masked)."""
  state = sampler.prefill([[4] * prompt_len] * batch,
                          [SamplingParams(max_new_tokens=steps + 1)] * batch)
  return state.cache.k.nbytes + state.cache.v.nbytes


def decode_row(sampler: Sampler, batch: int, sizes: dict, args, bandwidth: float) -> dict:
  cfg = sampler.config
  param_bytes = param_count(cfg) * np.dtype(cfg.param_dtype).itemsize
  row = measure(sampler, batch, sizes["prompt_len"], sizes["decode_steps"], args.repeats)
  kv = kv_cache_bytes(sampler, batch, sizes["prompt_len"], sizes["decode_steps"])
  bound = batch * bandwidth / (param_bytes + kv)
  return {"kind": "decode", "model": cfg.name, "param_bytes": param_bytes, "kv_cache_bytes": kv,
          **row, "bound_tokens_per_s": bound,
          "fraction_of_bound": row["decode_tokens_per_s"] / bound}


def guarded(row: dict, fn, deadline: float) -> dict:
  """fn()'s row, or `row` with the reason it was skipped or the error it raised."""
  if time.perf_counter() > deadline:
    return {**row, "skipped": "over the time budget (--budget_s)"}
  try:
    return fn()
  except Exception as e:  # noqa: BLE001  (OOM, unsupported kernel: record and go on)
    return {**row, "error": f"{type(e).__name__}: {str(e)[:500]}"}
  finally:
    gc.collect()


def train_rows(sizes: dict, args, device, peak: float, deadline: float) -> list[dict]:
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), [device])
  rows = []
  with jax.set_mesh(mesh):
    for batch_size, seq_len in sizes["train_shapes"]:
      for impl in IMPLS:
        row = {"kind": "train", "model": sizes["train_model"], "attention_impl": impl,
               "batch_size": batch_size, "seq_len": seq_len}
        if impl == "cudnn" and device.platform != "gpu":
          rows.append({**row, "skipped": "needs an NVIDIA GPU"})
          continue
        rows.append(guarded(row, lambda: train_row(sizes["train_model"], impl, batch_size,
                                                   seq_len, args, mesh, peak), deadline))
  return rows


def decode_rows(sizes: dict, args, bandwidth: float, deadline: float) -> list[dict]:
  # Decode attends to the cache; "xla" keeps the figure independent of the prefill kernel.
  cfg = get_config(sizes["decode_model"], dtype="bfloat16", param_dtype=sizes["param_dtype"],
                   attention_impl="xla")
  sampler = guarded({}, lambda: Sampler(init_model(cfg, seed=0), stop_token_ids=[]), deadline)
  rows = []
  for batch in DECODE_BATCHES:
    row = {"kind": "decode", "model": cfg.name, "batch": batch}
    if not isinstance(sampler, Sampler):
      rows.append({**row, **sampler})
      continue
    rows.append(guarded(row, lambda: decode_row(sampler, batch, sizes, args, bandwidth),
                        deadline))
  return rows


def status(r: dict) -> str:
  return f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error'][:70]}"


def print_table(rows: list[dict]) -> None:
  print(f"{'train':<12} {'attn':<6} {'batch x seq':>11} {'step s':>8} {'tokens/s':>10} "
        f"{'TFLOP/s':>8} {'MFU':>6}")
  for r in (r for r in rows if r["kind"] == "train"):
    head = f"{r['model']:<12} {r['attention_impl']:<6} {r['batch_size']:>3} x {r['seq_len']:<5}"
    if "mfu" not in r:
      print(f"{head} {status(r)}")
      continue
    print(f"{head} {r['step_s']:>8.3f} {r['tokens_per_s']:>10,.0f} "
          f"{r['model_flops_per_s'] / 1e12:>8.3f} {r['mfu']:>6.1%}")
  print(f"{'decode':<12} {'batch':>5} {'step ms':>8} {'tokens/s':>10} {'bound tok/s':>12} "
        f"{'of bound':>8}")
  for r in (r for r in rows if r["kind"] == "decode"):
    head = f"{r['model']:<12} {r['batch']:>5}"
    if "fraction_of_bound" not in r:
      print(f"{head} {status(r)}")
      continue
    print(f"{head} {r['decode_step_ms']:>8.2f} {r['decode_tokens_per_s']:>10,.1f} "
          f"{r['bound_tokens_per_s']:>12,.1f} {r['fraction_of_bound']:>8.1%}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny models (automatic on CPU)")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps (best kept)")
  parser.add_argument("--repeats", type=int, default=3, help="timed decode runs (best kept)")
  parser.add_argument("--remat", default="full", help="remat policy of the train step")
  parser.add_argument("--budget_s", type=float, default=450, help="skip cases started later")
  parser.add_argument("--json", default="benchmarks/gpu.json")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  device = jax.devices()[0]
  tiny = args.tiny or device.platform == "cpu"
  sizes = TINY if tiny else FULL
  peak = peaks(device)
  print(f"{device.device_kind} ({device.platform}), {'tiny' if tiny else 'full'} sizes; peak "
        f"{peak['peak_flops_per_s'] / 1e12:.3f} TFLOP/s ({peak['peak_flops_source']}), "
        f"bandwidth {peak['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({peak['bandwidth_source']})")
  deadline = start + args.budget_s
  rows = train_rows(sizes, args, device, peak["peak_flops_per_s"], deadline)
  rows += decode_rows(sizes, args, peak["bandwidth_bytes_per_s"], deadline)
  print_table(rows)
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"device": device.device_kind, "platform": device.platform,
                             "tiny": tiny, "sizes": sizes, **peak, "steps": args.steps,
                             "wall_s": time.perf_counter() - start, "rows": rows},
                            indent=2) + "\n")
  print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
