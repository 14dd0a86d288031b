"""Compile the real train step ahead of time for a TPU topology, without a TPU.

  python -m launch.aot --config configs/gemma_7b.py --topology v5e:16x16 [--config.x=y ...]

libtpu's topology description gives the devices; XLA compiles the sharded step for them and
reports per-chip memory and its cost model. Prints one JSON line; the step time behind the
tokens/s and MFU estimates is a compute/ICI roofline (see roofline_seconds).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # AOT needs no local accelerator
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: allow parallel runs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.base import model_config  # noqa: E402
from gemma_jax import flops, sharding  # noqa: E402
from gemma_jax.metrics import PEAK_FLOPS  # noqa: E402
from gemma_jax.model import abstract_model, param_count  # noqa: E402
from gemma_jax.optim import make_optimizer  # noqa: E402
from gemma_jax.train_step import (BATCH_KEYS, abstract_train_state, jit_train_step,  # noqa: E402
                                  lm_loss, make_train_step)

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16", "TPU topology, e.g. v5e:16x16")

# ICI bytes/s per chip, by the device_kind libtpu reports (peak FLOP/s: gemma_jax.metrics).
ICI_BYTES_PER_S = {"TPU v5 lite": 200e9, "TPU v5": 600e9, "TPU v4": 300e9, "TPU v6 lite": 448e9}


def roofline_seconds(model_flops_per_chip: float, param_bytes: int, fsdp: int, remat: str,
                     device_kind: str) -> float | None:
  """Step time if compute and ZeRO-3 traffic overlap perfectly: the larger of
  - compute: model FLOPs (+1/3 for re-running the forward under full remat) at peak;
  - ICI: params all-gathered three times (forward, remat forward, backward) and gradients
    reduce-scattered once, each moving (fsdp - 1) / fsdp of the parameter bytes per chip.
  Used because XLA's optimal_seconds is not usable for scanned programs (it counts a loop
  body once, and libtpu can return negative values)."""
  peak, ici = PEAK_FLOPS.get(device_kind), ICI_BYTES_PER_S.get(device_kind)
  if not peak or not ici:
    return None
  compute = model_flops_per_chip * (4 / 3 if remat == "full" else 1.0) / peak
  traffic = 4 * param_bytes * (fsdp - 1) / fsdp / ici
  return max(compute, traffic)


def compile_train_step(config, devices):
  """Lower + compile the train step for `devices`; returns (compiled, mesh, cfg, seconds)."""
  cfg = model_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  optimizer, schedule = make_optimizer(config.optimizer, config.train.steps)
  state = abstract_train_state(cfg, optimizer, mesh)
  sharding.check_replication(state["params"], jax.tree.map(lambda a: a.sharding, state["params"]),
                             config.sharding.max_replicated_fraction)
  batch_size, seq_len = config.train.global_batch_size, config.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len),
                                   jnp.float32 if k == "loss_weights" else jnp.int32,
                                   sharding=sharding.batch_sharding(mesh)) for k in BATCH_KEYS}
  loss_fn = lambda model, b, rng: lm_loss(model, b, rng, z_loss=config.train.z_loss, mesh=mesh,
                                          chunk_size=config.train.loss_chunk_size)
  graphdef = nnx.split(abstract_model(cfg))[0]
  step = make_train_step(graphdef, optimizer, loss_fn, schedule, config.train.microbatches)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jit_train_step(step, shardings, mesh).lower(state, batch).compile()
  return compiled, mesh, cfg, time.perf_counter() - start


def report(config, topology: str) -> dict:
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  compiled, mesh, cfg, seconds = compile_train_step(config, devices)
  mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  tokens = config.train.global_batch_size * config.train.seq_len
  chips, kind = len(devices), devices[0].device_kind
  model_flops = flops.train_flops_per_token(cfg, config.train.seq_len) * tokens
  param_bytes = param_count(cfg) * jnp.dtype(cfg.param_dtype).itemsize
  step_seconds = roofline_seconds(model_flops / chips, param_bytes, mesh.shape["fsdp"],
                                  cfg.remat_policy, kind)
  peak_bytes = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes \
      - mem.alias_size_in_bytes
  return {
      "config": config.model.preset, "topology": topology, "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape), "global_batch_tokens": tokens,
      "per_chip_bytes": {"argument": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes,
                         "output": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes,
                         "peak": peak_bytes},
      "per_chip_gib": round(peak_bytes / 2**30, 2),
      # XLA's cost model; a scanned loop body (one layer) is counted once.
      "xla_flops_per_chip": float(cost["flops"]),
      "xla_optimal_seconds": float(cost["optimal_seconds"]),
      "model_flops_per_step": model_flops,
      "step_seconds_estimate": step_seconds,
      "tokens_per_s_per_chip": tokens / step_seconds / chips if step_seconds else None,
      "mfu_estimate": (model_flops / chips / step_seconds / PEAK_FLOPS[kind]
                       if step_seconds else None),
      "compile_seconds": round(seconds, 1),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(report(_CONFIG.value, _TOPOLOGY.value)))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
