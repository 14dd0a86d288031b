"""Prefill and decode speed of the KV-cache sampler against the memory-bandwidth bound.

  python benchmarks/decode.py [--batch 1 16] [--prompt_len 128] [--steps 32]
      [--long_batch 1 4] [--long_prompt_len 2048]
      [--dtype float32] [--param_dtype float32] [--json benchmarks/decode.json]

Model: gemma3_270m's shape with 15 layers and a 32k vocabulary (~104M parameters, random
weights). Decoding one token for the whole batch reads every parameter once, so a step can
take no less than param bytes / memory bandwidth; the bandwidth is measured here as STREAM
"copy" does (bytes read + bytes written per second, large numpy copy, best of several).
A token also costs about 2 x params FLOPs, so the compute bound is measured matmul FLOP/s /
(2 x params) tokens/s; small batches hit the memory bound first, large ones the compute one.
Both bounds count the weights only: long-prompt rows also read their KV cache every step.
Decode tokens/s is timed over `steps` steps of one jitted while-loop (EOS ignored), after a
warm-up call that compiles; prefill tokens/s counts prompt tokens of the whole batch.

The long-prompt rows (cache longer than the 512-token sliding window) run twice: with the
ring-buffer cache (local layers keep `window` slots) and without it (every layer keeps the
full length, the cache before the ring existed); KV MiB is the whole batch's cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import numpy as np

from gemma_jax.config import get_config
from gemma_jax.model import init_model, param_count
from gemma_jax.sampler import Sampler, SamplingParams


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
  """Bytes moved (read + write) per second by a large memory copy."""
  src = np.ones(megabytes * 2**20 // 8)
  dst = np.empty_like(src)
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * src.nbytes / best


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large float32 matmul under XLA on the default device."""
  a = jax.numpy.ones((n, n), jax.numpy.float32)
  dot = jax.jit(lambda a: a @ a)
  dot(a).block_until_ready()
  return 2 * n**3 / best_time(lambda: dot(a), repeats)


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def cache_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state.cache))


def measure(sampler: Sampler, batch: int, prompt_len: int, steps: int, repeats: int) -> dict:
  vocab = sampler.config.vocab_size
  rng = np.random.default_rng(batch)
  prompts = [rng.integers(4, vocab, prompt_len).tolist() for _ in range(batch)]
  params = [SamplingParams(max_new_tokens=steps + 1)] * batch  # greedy, never stops early
  prefill = lambda: sampler.prefill(prompts, params)
  prefill()  # compile
  prefill_s = best_time(prefill, repeats)
  sampler.decode(prefill(), steps)  # compile
  decode_times = []
  for _ in range(repeats):
    state = jax.block_until_ready(prefill())
    start = time.perf_counter()
    state = jax.block_until_ready(sampler.decode(state, steps))
    decode_times.append(time.perf_counter() - start)
    assert int(state.count[0]) == steps + 1, "decode stopped early"
  step_s = min(decode_times) / steps
  return dict(batch=batch, prompt_len=prompt_len, steps=steps, kv_cache_bytes=cache_bytes(state),
              prefill_tokens_per_s=batch * prompt_len / prefill_s, prefill_s=prefill_s,
              decode_step_ms=1e3 * step_s, decode_tokens_per_s=batch / step_s)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--long_batch", type=int, nargs="*", default=[1, 4],
                      help="batch sizes of the long-prompt rows (ring cache on and off)")
  parser.add_argument("--long_prompt_len", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="compute dtype")
  parser.add_argument("--param_dtype", default="float32")
  parser.add_argument("--json", default="benchmarks/decode.json")
  args = parser.parse_args(argv)

  cfg = get_config("gemma3_270m", num_layers=15, vocab_size=32_768, dtype=args.dtype,
                   param_dtype=args.param_dtype).replace(name="gemma3_100m")
  model = init_model(cfg, seed=0)
  params = param_count(cfg)
  param_bytes = params * np.dtype(args.param_dtype).itemsize
  bandwidth, flops = copy_bandwidth(), matmul_flops()
  bound_steps = bandwidth / param_bytes
  samplers = {ring: Sampler(model, stop_token_ids=[], ring_cache=ring) for ring in (True, False)}
  runs = [(b, args.prompt_len, "n/a") for b in args.batch]
  runs += [(b, args.long_prompt_len, ring) for b in args.long_batch for ring in ("off", "on")]
  rows = []
  for batch, prompt_len, ring in runs:
    row = measure(samplers[ring != "off"], batch, prompt_len, args.steps, args.repeats)
    row["ring_cache"] = ring
    row["bound_tokens_per_s"] = batch * bound_steps
    row["fraction_of_bound"] = row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
    row["compute_bound_tokens_per_s"] = flops / (2 * params)
    rows.append(row)

  print(f"{cfg.name}: {params / 1e6:.1f}M params, {param_bytes / 2**20:.0f} MiB "
        f"({args.param_dtype}), compute {args.dtype}; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s -> {bound_steps:.1f} decode steps/s; matmul "
        f"{flops / 1e9:.0f} GFLOP/s; {jax.devices()[0].device_kind} x{os.cpu_count()} "
        f"{platform.machine()}")
  print("| batch | prompt | ring cache | KV MiB | prefill tok/s | decode step ms | decode tok/s "
        "| memory bound tok/s | of memory bound | compute bound tok/s |")
  print("|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['batch']} | {r['prompt_len']} | {r['ring_cache']} | "
          f"{r['kv_cache_bytes'] / 2**20:,.0f} | "
          f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_step_ms']:.1f} | "
          f"{r['decode_tokens_per_s']:,.1f} | {r['bound_tokens_per_s']:,.1f} | "
          f"{r['fraction_of_bound']:.0%} | {r['compute_bound_tokens_per_s']:,.0f} |")
  result = dict(model=cfg.name, params=params, param_bytes=param_bytes, dtype=args.dtype,
                param_dtype=args.param_dtype, copy_bandwidth_bytes_per_s=bandwidth,
                matmul_flops_per_s=flops,
                device=str(jax.devices()[0]), cpu_count=os.cpu_count(), rows=rows)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
