"""Compile a trainer's real step, or the sampler's decode step, ahead of time for a TPU
topology, without a TPU, and read what the compiled program does.

  python -m launch.aot --config configs/gemma_7b.py --topology v5e:16x16 [--config.x=y ...]
      [--task pretrain|sft|reward|rlhf|dpo] [--decode] [--audit]

libtpu's topology description gives the devices; XLA compiles the sharded step for them and
reports per-chip memory. The compiled HLO is read by launch.hlo: FLOPs and collectives with
every loop body counted per trip (XLA's own cost analysis counts a scanned layer once), from
which the step time is estimated as FLOPs at the chip's peak plus collective bytes over its
ICI bandwidth (no overlap assumed; an estimate, not a measurement). --audit prints every
collective site and checks the totals against ZeRO-3's expectation (launch.audit). Prints
one JSON line last. The library: launch.compile_step.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from gemma_jax import exits
from launch import audit as audit_lib
from launch.compile_step import TASKS, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16", "TPU topology, e.g. v5e:16x16")
_TASK = flags.DEFINE_enum("task", "pretrain", list(TASKS),
                          "whose train step: its loss, model and batch")
_DECODE = flags.DEFINE_bool("decode", False, "compile one decode step of the sampler instead")
_AUDIT = flags.DEFINE_bool("audit", False, "print every collective and check ZeRO-3's totals")

_TRACEBACK = flags.DEFINE_bool("traceback", False, "show an error's full stack, not one line")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return exits.run("launch.aot", lambda _: _print_report(), [], traceback=_TRACEBACK.value)


def _print_report() -> int:
  result = report(_CONFIG.value, _TOPOLOGY.value, _TASK.value, _DECODE.value, _AUDIT.value)
  if _AUDIT.value:
    z = result["zero3"]
    print("per chip per step, GB:  " + "  ".join(
        f"{k} {v / 1e9:.2f}" for k, v in sorted(z["measured_bytes"].items())), file=sys.stderr)
    print("ZeRO-3 expects, GB:     " + "  ".join(
        f"{k} {v / 1e9:.2f}" for k, v in sorted(z["expected_bytes"].items())), file=sys.stderr)
    print(f"measured / expected: {z['ratio']:.2f} (ok within {audit_lib.FACTOR:g}x); "
          f"[tokens, vocab] collectives: {z['logits_collectives'] or 'none'}", file=sys.stderr)
  print(json.dumps(result))
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  app.run(main)
