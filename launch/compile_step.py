"""Compile a trainer's real step, or the sampler's decode step, ahead of time for a TPU
topology, without a TPU, and read what the compiled program does (the library behind
`python -m launch.aot` and `python -m launch.plan`).

libtpu's topology description gives the devices; XLA compiles the sharded step for them and
reports per-chip memory. The compiled HLO is read by launch.hlo: FLOPs and collectives with
every loop body counted per trip (XLA's own cost analysis counts a scanned layer once), from
which the step time is estimated as FLOPs at the chip's peak plus collective bytes over its
ICI bandwidth (no overlap assumed; an estimate, not a measurement). Compiles use the libtpu
flags TPU jobs run with (launch.libtpu_flags) unless LIBTPU_INIT_ARGS is set.
"""

from __future__ import annotations

import os
import sys
import time

from launch import libtpu_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # AOT needs no local accelerator
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: allow parallel runs
libtpu_flags.set_default()  # read when libtpu loads: before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from configs.base import model_config  # noqa: E402
from gemma_jax import flops, lora, sampler, sharding  # noqa: E402
from gemma_jax.metrics import PEAK_FLOPS  # noqa: E402
from gemma_jax.model import attention_impl  # noqa: E402
from gemma_jax.optim import make_optimizer  # noqa: E402
from gemma_jax.train_state import ModelRecipe, RunLayout  # noqa: E402
from gemma_jax.train_step import jit_train_step  # noqa: E402
from launch import audit as audit_lib  # noqa: E402
from launch import hlo  # noqa: E402
from trainers import dpo, pretrain, reward, rlhf, sft  # noqa: E402

TASKS = {"pretrain": pretrain.TASK, "sft": sft.TASK, "reward": reward.TASK, "rlhf": rlhf.TASK,
         "dpo": dpo.TASK}
# Float batch entries (weights, masks, log-probs); the others are int32 token-shaped.
_FLOAT_KEYS = ("loss_weights", "mask", "logprobs")
# ICI bytes/s per chip, by the device_kind libtpu reports (peak FLOP/s: gemma_jax.metrics).
ICI_BYTES_PER_S = {"TPU v5 lite": 200e9, "TPU v5": 600e9, "TPU v4": 300e9, "TPU v6 lite": 448e9}
HBM_BYTES = {"TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30, "TPU v4": 32 * 2**30,
             "TPU v6 lite": 32 * 2**30}


def build_layout(config, devices, task: str = "pretrain") -> RunLayout:
  """The run layout a trainer builds for `config` (with its replication guard)."""
  cfg = model_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  optimizer, _ = make_optimizer(config.optimizer, config.train.steps)
  lora_cfg = lora.LoRAConfig.from_config(config.lora)  # None: full training
  make_model = TASKS[task].make_model
  recipe = ModelRecipe(make_model) if lora_cfg is None else lora.recipe(lora_cfg, make_model)
  layout = RunLayout.build(cfg, optimizer, mesh, recipe)
  layout.check_replication(config.sharding.max_replicated_fraction)
  return layout


def compile_train_step(config, devices, task: str = "pretrain"):
  """Lower + compile `task`'s train step for `devices`: (compiled, layout, seconds).
  config.lora.rank > 0 compiles the LoRA / QLoRA step."""
  layout = build_layout(config, devices, task)
  t = TASKS[task]
  _, schedule = make_optimizer(config.optimizer, config.train.steps)
  shape = (config.train.global_batch_size, config.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k.endswith(_FLOAT_KEYS) else jnp.int32,
                                   sharding=sharding.batch_sharding(layout.mesh))
           for k in t.batch_keys}
  step = jit_train_step(layout, t.make_loss(config), schedule,
                        microbatches=config.train.microbatches, batch_keys=t.batch_keys)
  start = time.perf_counter()
  with jax.set_mesh(layout.mesh):
    compiled = step.lower(layout.abstract, batch).compile()
  return compiled, layout, time.perf_counter() - start


def compile_decode_step(config, devices, new_tokens: int = 64):
  """Lower + compile the sampler's decode loop (global batch train.global_batch_size, a
  prompt of train.seq_len tokens) for `devices`: (compiled, layout, seconds). One decode
  step is one trip of its while loop, whose trip count is dynamic (launch.hlo counts it once).
  """
  layout = build_layout(config, devices)
  mesh, axes = layout.mesh, sharding.batch_axes(layout.mesh)
  graphdef, params = layout.graphdef, nnx.State(layout.abstract.model_params())
  rows = config.train.global_batch_size
  put = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  settings = sampler.RowSettings(*(put((rows,), d) for d in (
      jnp.float32, jnp.int32, jnp.float32, jnp.int32, jnp.uint32)))
  stop_ids = np.asarray([1], np.int32)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    prefill = sampler._prefill.lower(
        graphdef, params, put((rows, config.train.seq_len), jnp.int32), put((rows,), jnp.int32),
        settings, stop_ids, cache_length=config.train.seq_len + new_tokens, max_new=new_tokens,
        mesh=mesh, batch_axes=axes)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         prefill.out_info, prefill.compile().output_shardings)
    compiled = sampler._decode.lower(graphdef, params, state, stop_ids, put((rows,), jnp.bool_),
                                     jax.ShapeDtypeStruct((), jnp.int32), mesh=mesh,
                                     batch_axes=axes).compile()
  return compiled, layout, time.perf_counter() - start


def kernel_flops_per_chip(cfg, seq_len: int, tokens: int, chips: int) -> float:
  """FLOPs of the splash-attention kernels of a train step, which the HLO cannot show (they
  are Mosaic custom calls): the causal, window-aware attention matmuls (gemma_jax.flops) x
  (2 forward + 2 rematerialised forward + 7 backward: the dq kernel's 3 and the dkv
  kernel's 4) / 2, the rematerialised forward dropped under remat 'none'. An estimate: the
  kernels also compute the masked part of their diagonal blocks. 0 without splash."""
  if attention_impl.resolve(cfg, seq_len, "tpu") != "splash":
    return 0.0
  passes = (2 + 2 * (cfg.remat_policy != "none") + 7) / 2
  return passes * flops.attention_flops_per_token(cfg, seq_len) * tokens / chips


def step_seconds(a: hlo.Audit, device_kind: str, kernel_flops: float = 0.0
                 ) -> dict[str, float] | None:
  """Estimated seconds per step from the compiled program: FLOPs at peak (those of the
  HLO's dots plus `kernel_flops`, both per chip, loop bodies counted per trip) plus
  collective traffic over the ICI bandwidth."""
  peak, ici = PEAK_FLOPS.get(device_kind), ICI_BYTES_PER_S.get(device_kind)
  if not peak or not ici:
    return None
  compute, comms = (a.flops + kernel_flops) / peak, a.traffic_bytes / ici
  return {"compute": compute, "ici": comms, "total": compute + comms}


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology description. A single chip ("v5e:1x1", which libtpu's
  default host bounds of 2x2 refuse) is the first chip of the 2x2 description."""
  kind, _, shape = topology.partition(":")
  if shape in ("1x1", "1x1x1"):
    single = f"{kind}:{'2x2' if shape == '1x1' else '2x2x1'}"
    return topologies.get_topology_desc(platform="tpu", topology_name=single).devices[:1]
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def state_bytes_per_chip(state) -> dict[str, int]:
  """Bytes of each train-state entry held by one chip (its shard of every array)."""
  def per_chip(tree) -> int:
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree))
  return {k: per_chip(getattr(state, k)) for k in ("params", "frozen", "opt_state")
          if getattr(state, k) is not None}


def report(config, topology: str, task: str = "pretrain", decode: bool = False,
           show_audit: bool = False) -> dict:
  devices = topology_devices(topology)
  if decode:
    compiled, layout, seconds = compile_decode_step(config, devices)
  else:
    compiled, layout, seconds = compile_train_step(config, devices, task)
  mem = compiled.memory_analysis()
  audited = hlo.audit(compiled.as_text())
  tokens = config.train.global_batch_size * (1 if decode else config.train.seq_len)
  chips, kind = len(devices), devices[0].device_kind
  model_flops = (0.0 if decode else
                 flops.train_flops_per_token(layout.cfg, config.train.seq_len) * tokens)
  kernel_flops = 0.0 if decode else kernel_flops_per_chip(layout.cfg, config.train.seq_len,
                                                          tokens, chips)
  estimate = step_seconds(audited, kind, kernel_flops)
  total = estimate["total"] if estimate else None
  peak_bytes = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes \
      - mem.alias_size_in_bytes
  checked = audit_lib.check(audited, layout, decode=decode)
  if show_audit:
    print(audited.table(), file=sys.stderr)
  return {
      "config": config.model.preset, "task": "decode" if decode else task,
      "topology": topology, "device_kind": kind, "mesh": dict(layout.mesh.shape),
      "global_batch_tokens": tokens,
      "per_chip_bytes": {"argument": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes,
                         "output": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes,
                         "peak": peak_bytes},
      "per_chip_gib": round(peak_bytes / 2**30, 2),
      "state_bytes_per_chip": state_bytes_per_chip(layout.abstract),
      "lora": config.lora.to_dict() if config.lora.rank else None,
      "hlo_flops_per_chip": audited.flops,  # loop bodies counted per trip
      "attention_impl": ("xla" if decode else  # a decode step attends over its cache
                         attention_impl.resolve(layout.cfg, config.train.seq_len, "tpu")),
      "kernel_flops_per_chip": kernel_flops,  # estimated: the HLO cannot count them
      "collective_bytes_per_chip": audited.traffic_bytes,
      "zero3": checked,
      "model_flops_per_step": model_flops,
      "step_seconds_estimate": estimate,
      "tokens_per_s_per_chip": tokens / total / chips if total else None,
      "mfu_estimate": (model_flops / chips / total / PEAK_FLOPS[kind]
                       if total and model_flops else None),
      "compile_seconds": round(seconds, 1),
  }
