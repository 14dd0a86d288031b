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
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.base import model_config  # noqa: E402
from gemma_jax import flops, lora, sharding  # noqa: E402
from gemma_jax.metrics import PEAK_FLOPS  # noqa: E402
from gemma_jax.model import param_count  # noqa: E402
from gemma_jax.optim import make_optimizer  # noqa: E402
from gemma_jax.train_state import ModelRecipe, RunLayout  # noqa: E402
from gemma_jax.losses import lm_loss  # noqa: E402
from gemma_jax.train_step import BATCH_KEYS, jit_train_step  # noqa: E402

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
  """Lower + compile the train step for `devices`; returns (compiled, layout, seconds).
  config.lora.rank > 0 compiles the LoRA / QLoRA step."""
  cfg = model_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  optimizer, schedule = make_optimizer(config.optimizer, config.train.steps)
  lora_cfg = lora.LoRAConfig.from_config(config.lora)  # None: full training
  recipe = ModelRecipe() if lora_cfg is None else lora.recipe(lora_cfg)
  layout = RunLayout.build(cfg, optimizer, mesh, recipe)
  layout.check_replication(config.sharding.max_replicated_fraction)  # as trainers/loop.py
  batch_size, seq_len = config.train.global_batch_size, config.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len),
                                   jnp.float32 if k == "loss_weights" else jnp.int32,
                                   sharding=sharding.batch_sharding(mesh)) for k in BATCH_KEYS}
  loss_fn = lambda model, b, rng: lm_loss(model, b, rng, z_loss=config.train.z_loss,
                                          chunk_size=config.train.loss_chunk_size)
  step = jit_train_step(layout, loss_fn, schedule, microbatches=config.train.microbatches)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(layout.abstract, batch).compile()
  return compiled, layout, time.perf_counter() - start


def state_bytes_per_chip(state) -> dict[str, int]:
  """Bytes of each train-state entry held by one chip (its shard of every array)."""
  def per_chip(tree) -> int:
    total = 0
    for a in jax.tree.leaves(tree):
      shard = a.sharding.shard_shape(a.shape)
      n = 1
      for d in shard:
        n *= d
      total += n * jnp.dtype(a.dtype).itemsize
    return total
  return {k: per_chip(getattr(state, k)) for k in ("params", "frozen", "opt_state")
          if getattr(state, k) is not None}


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology description. A single chip ("v5e:1x1", which libtpu's
  default host bounds of 2x2 refuse) is the first chip of the 2x2 description."""
  kind, _, shape = topology.partition(":")
  if shape in ("1x1", "1x1x1"):
    single = f"{kind}:{'2x2' if shape == '1x1' else '2x2x1'}"
    return topologies.get_topology_desc(platform="tpu", topology_name=single).devices[:1]
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def report(config, topology: str) -> dict:
  devices = topology_devices(topology)
  compiled, layout, seconds = compile_train_step(config, devices)
  mesh, cfg = layout.mesh, layout.cfg
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
      "state_bytes_per_chip": state_bytes_per_chip(layout.abstract),
      "lora": config.lora.to_dict() if config.lora.rank else None,
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
