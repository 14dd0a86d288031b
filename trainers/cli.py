"""The command line every trainer shares:

  python -m trainers.<name> --config configs/FILE.py [--config.a.b=value ...] --workdir DIR
      [--distributed]

Multi-host: every host runs the same command; --distributed (TPU VM pods) or the environment
that launch.local sets makes them one job (gemma_jax.distributed).

Overrides are parsed by ml_collections' config_flags against the locked config, so a
misspelt key or a value of the wrong type fails before anything starts; so does any value
`configs.base.validate` rejects, and any error the config file raises (named by file and
line). Such errors print one line naming the key and exit with status 2; any other error
prints one line and exits with 1 (gemma_jax.exits; --traceback shows the stack). A run
stopped by SIGTERM saves, then exits with status 75 (exits.EXIT_PREEMPTED): rerun to resume.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import runpy
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs.base import ConfigError
from gemma_jax import distributed as distributed_init
from gemma_jax import exits
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
  except Exception as e:  # noqa: BLE001 -- anything the config file itself raises
    if where := _config_file_line(e, _config_spec(argv).partition(":")[0]):
      raise ConfigError(f"{where}: {_config_file_message(e)}") from e
    if isinstance(e, (AttributeError, KeyError)):  # an override names a key the config lacks
      raise ConfigError(_unknown_override(argv) or str(e)) from e
    if isinstance(e, (flags.Error, OSError, ValueError, TypeError)):
      raise ConfigError(str(e).strip()) from e
    raise
  if not fv.workdir:
    raise ConfigError("--workdir is required: where checkpoints and metrics go")
  return config, fv.workdir, fv.distributed


def _config_spec(argv: list[str]) -> str:
  """The value of --config ("FILE" or "FILE:ARG")."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _config_file_line(error: BaseException, path: str) -> str | None:
  """'FILE, line N' where the config file raised `error` (None if the error came from
  elsewhere, e.g. an override)."""
  if isinstance(error, SyntaxError) and error.filename:
    frames = [(error.filename, error.lineno)]
  else:
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
  target = os.path.abspath(path)
  lines = [line for file, line in frames if os.path.abspath(file) == target]
  return f"{path}, line {lines[-1]}" if lines else None


def _config_file_message(error: BaseException) -> str:
  """The error of a config file, without ml_collections' dump of the other fields."""
  if isinstance(error, SyntaxError):
    return error.msg
  text = str(error)
  if key := re.search(r'Key "([^"]+)" does not exist', text):
    close = re.search(r'Did you mean "([^"]+)"', text)
    hint = f" (did you mean {close[1]!r}?)" if close else ""
    return f"sets {key[1]!r}, which the config has no key for{hint}"
  return exits.describe(error)


def _unknown_override(argv: list[str]) -> str | None:
  """'--config.a.b: config.a has no key b (did you mean ...)' for the first bad override."""
  path, _, arg = _config_spec(argv).partition(":")
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
  """Run `task` from the command line (argv[0] is the program); returns the exit status:
  0 when the run reached train.steps, exits.EXIT_PREEMPTED when SIGTERM stopped it after a
  save (rerun to resume), 2 for a bad flag or config, 1 for any other error (one line)."""
  argv = sys.argv if argv is None else argv
  return exits.run(task.name, functools.partial(_main, task), argv)


def _main(task: loop.Task, argv: list[str]) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config, workdir, distributed = parse(argv)
    # Before anything touches a device: every host of a pod runs this same command.
    distributed_init.initialize(auto=distributed)
    summary = loop.run(config, workdir, task)
  except ConfigError as e:
    print(f"config error: {exits.describe(e)}", file=sys.stderr)
    return exits.EXIT_USAGE
  except distributed_init.DistributedError as e:
    print(f"distributed error: {exits.describe(e)}", file=sys.stderr)
    return exits.EXIT_USAGE
  return report(task, summary)


def report(task: loop.Task, summary: dict) -> int:
  """Print how the run ended; its exit status."""
  if summary.get("stopped_by") == "SIGTERM":
    print(f"{task.name} stopped by SIGTERM at step {summary['step']} after saving a checkpoint; "
          f"rerun the same command to resume (exit status {exits.EXIT_PREEMPTED})", flush=True)
    return exits.EXIT_PREEMPTED
  done = {k: summary[k] for k in ("step", "loss", "eval_loss") if k in summary}
  print(f"{task.name} done: {done}", flush=True)
  return exits.EXIT_OK
