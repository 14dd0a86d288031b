"""Multi-host start-up: one JAX process per host, joined by `jax.distributed.initialize`.

On a TPU VM pod (and under Slurm or Open MPI) JAX finds the coordinator, the process count
and this process's id itself: `initialize(auto=True)` (the trainers' `--distributed` flag).
Elsewhere the launcher says them in the environment, which `initialize()` reads:

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator (JAX itself reads this one)
  JAX_NUM_PROCESSES         how many processes make up the job
  JAX_PROCESS_ID            this process's index, 0 .. JAX_NUM_PROCESSES - 1

`launch.local` sets them to emulate N hosts on one machine with CPU devices. On CPU the
cross-process collectives are gloo's over TCP (`jax_cpu_collectives_implementation`, JAX
0.10's default; set here explicitly all the same). A SIGTERM to any process reaches JAX's
preemption service, which makes every process stop at the same step (trainers/loop.py).

The small helpers below are what the trainer needs to behave as one job: `broadcast_bytes`
(process 0's file contents to every host), `gather_bytes` (every host's), `all_true` and
`max_over_processes` (agreement on a yes/no or on sizes) and `raise_together` (a fault seen
by one host stops every host with its message, instead of leaving the others waiting in a
collective).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(RuntimeError):
  """A multi-host setting that cannot work; the message names the variable or flag."""


def env_settings(environ: dict[str, str] | None = None) -> dict | None:
  """{coordinator_address, num_processes, process_id} from the environment, or None when
  neither count nor id is set. Some but not all set is an error naming the missing ones."""
  env = os.environ if environ is None else environ
  names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  given = {n: env[n] for n in names if env.get(n)}
  if set(given) <= {ENV_COORDINATOR}:  # a coordinator alone: JAX's auto-detection uses it
    return None
  if missing := [n for n in names if n not in given]:
    raise DistributedError(f"{', '.join(missing)} not set, but {', '.join(given)} is: set all "
                           f"of {', '.join(names)} (or none, and pass --distributed on a TPU VM)")
  try:
    count, index = int(given[ENV_NUM_PROCESSES]), int(given[ENV_PROCESS_ID])
  except ValueError as e:
    raise DistributedError(f"{ENV_NUM_PROCESSES}={given[ENV_NUM_PROCESSES]!r} and "
                           f"{ENV_PROCESS_ID}={given[ENV_PROCESS_ID]!r} must be integers") from e
  if not 0 <= index < count:
    raise DistributedError(f"{ENV_PROCESS_ID}={index} is not in [0, {ENV_NUM_PROCESSES}={count})")
  return {"coordinator_address": given[ENV_COORDINATOR], "num_processes": count,
          "process_id": index}


def initialize(auto: bool = False, *, initialization_timeout: int = 300,
               heartbeat_timeout_seconds: int = 100) -> bool:
  """Join the multi-host job before any JAX computation; returns whether it did.

  Settings from the environment (see the module docstring) win; otherwise `auto` lets JAX
  detect the cluster (TPU VM metadata, Slurm, Open MPI). Neither: a single-process run, and
  nothing is done. Call once per process, before anything touches a device.
  """
  settings = env_settings()
  if settings is None and not auto:
    return False
  if jax.distributed.is_initialized():
    return True
  if settings is not None:  # affects the CPU backend only
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(settings or {}), initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  log.info("process %d of %d: %d local of %d devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's `data` on every process (the others pass None); a no-op with one process."""
  if jax.process_count() == 1:
    assert data is not None, "process 0 must give the data"
    return data
  from jax.experimental import multihost_utils

  is_source = jax.process_index() == 0
  size = np.int64(len(data) if is_source else 0)
  size = int(multihost_utils.broadcast_one_to_all(size))
  buffer = np.frombuffer(data, np.uint8) if is_source else np.zeros(size, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def all_true(value: bool) -> bool:
  """Whether `value` holds on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(value, np.bool_))))


def gather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (the same list on every process)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils

  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
  buffer = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buffer))
  return [rows[i, :int(n)].tobytes() for i, n in enumerate(sizes)]


def max_over_processes(values: tuple[int, ...]) -> tuple[int, ...]:
  """The elementwise maximum of `values` over all processes."""
  if jax.process_count() == 1:
    return tuple(values)
  from jax.experimental import multihost_utils

  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
  return tuple(int(v) for v in gathered.reshape(-1, len(values)).max(axis=0))


def raise_together(error: str | None, exception: type[Exception] = ValueError) -> None:
  """Raise `exception` on every process if any process has an `error` (the first one's
  message, naming its process); return if none has. Every process must call it."""
  if jax.process_count() == 1:
    if error:
      raise exception(error)
    return
  for index, message in enumerate(gather_bytes((error or "").encode())):
    if message:
      raise exception(f"process {index}: {message.decode()}")


def check_shared_directory(directory: str | os.PathLike, what: str) -> None:
  """Refuse a `directory` that the hosts do not all see (each with its own local disk):
  multi-host orbax checkpoints need one file system, e.g. a gcsfuse bucket or NFS mounted
  at the same path on every host. `what` names the setting (e.g. '--workdir')."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  directory = Path(directory)
  token = broadcast_bytes(secrets.token_hex(8).encode() if jax.process_index() == 0 else None)
  marker = directory / f".shared-check-{token.decode()}"
  if jax.process_index() == 0:
    marker.write_bytes(token)
  multihost_utils.sync_global_devices(f"gemma_jax shared check {token.decode()}")
  seen = marker.is_file() and marker.read_bytes() == token
  shared = all_true(seen)
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  if not shared:
    raise DistributedError(f"{what} {directory} is not one directory seen by every host (process "
                           f"{jax.process_index()} {'sees' if seen else 'does not see'} a file "
                           "process 0 wrote there): multi-host checkpoints need a shared file "
                           "system, e.g. a gcsfuse-mounted bucket or NFS at the same path")
