"""The command line every trainer shares:

  python -m trainers.<name> --config configs/FILE.py [--config.a.b=value ...] --workdir DIR
      [--distributed]

Multi-host: every host runs the same command; --distributed (TPU VM pods) or the environment
that launch.local sets makes them one job (gemma_jax.distributed).

Overrides are parsed by ml_collections' config_flags against the locked config, so a
misspelt key or a value of the wrong type fails before anything starts; so does any value
`configs.base.validate` rejects. Errors print one line naming the key and exit with status 2.
"""

from __future__ import annotations

import difflib
import logging
import runpy
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs.base import ConfigError
from gemma_jax import distributed as distributed_init
from trainers import loop


def parse(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, bool]:
  """(config, workdir, distributed) from argv (argv[0] is the program name)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "job config file, e.g. configs/tiny.py",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, config.json",
                      flag_values=fv)
  flags.DEFINE_bool("distributed", False, "join a multi-host job first: the cluster is "
                    "auto-detected (TPU VM pods, Slurm, Open MPI); without the flag, the "
                    "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment "
                    "(launch.local) still joins one", flag_values=fv)
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    raise ConfigError("--config is required, e.g. --config configs/tiny.py")
  try:
    fv(argv)
    config = fv.config
  except (AttributeError, KeyError) as e:  # an override names a key the config lacks
    raise ConfigError(_unknown_override(argv) or str(e)) from e
  except (flags.Error, OSError, ValueError, TypeError) as e:
    raise ConfigError(str(e).strip()) from e
  if not fv.workdir:
    raise ConfigError("--workdir is required: where checkpoints and metrics go")
  return config, fv.workdir, fv.distributed


def _unknown_override(argv: list[str]) -> str | None:
  """'--config.a.b: config.a has no key b (did you mean ...)' for the first bad override."""
  spec = next(a.split("=", 1)[1] if "=" in a else argv[i + 2]
              for i, a in enumerate(argv[1:]) if a == "--config" or a.startswith("--config="))
  path, _, arg = spec.partition(":")
  config = runpy.run_path(path)["get_config"](*([arg] if arg else []))
  for a in argv[1:]:
    if not a.startswith("--config."):
      continue
    keys = a[len("--config."):].split("=", 1)[0].split(".")
    node, where = config, "config"
    for key in keys:
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {sorted(known)}"
        return f"--config.{'.'.join(keys)}: {where} has no key {key!r}{hint}"
      node, where = node[key], f"{where}.{key}"
  return None


def main(task: loop.Task, argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config, workdir, distributed = parse(argv)
    # Before anything touches a device: every host of a pod runs this same command.
    distributed_init.initialize(auto=distributed)
    summary = loop.run(config, workdir, task)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except distributed_init.DistributedError as e:
    print(f"distributed error: {e}", file=sys.stderr)
    return 2
  done = {k: summary[k] for k in ("step", "loss", "eval_loss", "stopped_by") if k in summary}
  print(f"{task.name} done: {done}", flush=True)
  return 0
