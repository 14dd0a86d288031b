"""Emulate a multi-host job on one machine: N local processes, each with K CPU devices.

  python -m launch.local --processes 2 --devices-per-process 4 -- \
      python -m trainers.pretrain --config configs/tiny.py --workdir /tmp/tiny2

Every process gets the environment a pod host would need (see gemma_jax.distributed):
JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port> (process 0 runs the coordinator),
JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=K. The trainers join the job from these
variables alone, and JAX's CPU backend then runs cross-process collectives over gloo (TCP), so
the program sees N x K global devices exactly as on N hosts.

Output lines are prefixed with the process index ("[1] ..."). SIGINT and SIGTERM are forwarded
to every process (a trainer saves a checkpoint and exits on SIGTERM); a second signal kills
them. When one process fails, the others are sent SIGTERM, then SIGKILL after --grace seconds
(they may be blocked in a collective with the dead one), and the launcher exits with the first
failure's status. A process killed by signal S counts as status 128 + S. A trainer stopped by
SIGTERM exits with 75 (gemma_jax.exits.EXIT_PREEMPTED) after every process saved the same
step: that is no failure (the others are left to finish their save); the launcher exits with 75
too, saying the job can resume.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO

from gemma_jax import exits
from gemma_jax.exits import EXIT_PREEMPTED

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(index: int, processes: int, devices_per_process: int, coordinator: str,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of emulated host `index`: `base` (default os.environ) plus the
  distributed settings and K CPU devices (replacing a device count already in XLA_FLAGS)."""
  env = dict(os.environ if base is None else base)
  xla_flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join([*xla_flags, f"{_DEVICE_COUNT_FLAG}={devices_per_process}"]),
      "JAX_COORDINATOR_ADDRESS": coordinator,
      "JAX_NUM_PROCESSES": str(processes),
      "JAX_PROCESS_ID": str(index),
      "PYTHONUNBUFFERED": "1",  # lines arrive as they are printed, not at exit
  })
  return env


def exit_status(returncode: int) -> int:
  """A Popen returncode as a shell status: -S (killed by signal S) -> 128 + S."""
  return 128 - returncode if returncode < 0 else returncode


class LocalJob:
  """N processes of one command; `wait()` returns the job's exit status."""

  def __init__(self, command: Sequence[str], processes: int, devices_per_process: int, *,
               grace: float = 10.0, prefix: bool = True, out: BinaryIO | None = None,
               port: int | None = None):
    if processes < 1 or devices_per_process < 1:
      raise ValueError(f"--processes={processes} and --devices-per-process="
                       f"{devices_per_process} must be >= 1")
    if not command:
      raise ValueError("no command: put it after --, e.g. -- python -m trainers.pretrain ...")
    self.coordinator = f"127.0.0.1:{port or free_port()}"
    self._grace = grace
    self._out = out or sys.stdout.buffer
    self._lock = threading.Lock()
    self._signals = 0
    self.procs: list[subprocess.Popen] = []
    self._readers: list[threading.Thread] = []
    for i in range(processes):
      # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it
      # (so each process sees one SIGINT, not two).
      proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=process_env(i, processes, devices_per_process,
                                              self.coordinator),
                              start_new_session=True)
      self.procs.append(proc)
      reader = threading.Thread(target=self._pump, args=(proc.stdout, f"[{i}] " if prefix else ""),
                                daemon=True)
      reader.start()
      self._readers.append(reader)

  def _pump(self, stream: BinaryIO, prefix: str) -> None:
    for line in iter(stream.readline, b""):
      with self._lock:
        self._out.write(prefix.encode() + line)
        self._out.flush()

  def forward(self, signum: int) -> None:
    """Send `signum` to every running process; from the second call on, SIGKILL."""
    self._signals += 1
    self._send(signal.SIGKILL if self._signals > 1 else signum)

  def _send(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signum)  # the process and anything it started
        except ProcessLookupError:
          pass

  def wait(self) -> int:
    """Wait for every process; on the first failure stop the rest. Returns the job status."""
    failed: int | None = None
    deadline = None
    while [p.poll() for p in self.procs].count(None):  # poll every one: sets returncode
      if failed is None:
        failed = next((exit_status(p.returncode) for p in self.procs
                       if p.returncode not in (None, 0, EXIT_PREEMPTED)), None)
        if failed is not None:
          self._note(f"a process exited with status {failed}: stopping the others")
          self._send(signal.SIGTERM)
          deadline = time.monotonic() + self._grace
      elif deadline is not None and time.monotonic() > deadline:
        self._send(signal.SIGKILL)
        deadline = None
      time.sleep(0.05)
    for reader in self._readers:
      reader.join(timeout=5)
    if failed is None:
      failed = next((exit_status(p.returncode) for p in self.procs if p.returncode), 0)
    if failed == EXIT_PREEMPTED:
      self._note(f"preempted (status {EXIT_PREEMPTED}): the job saved a checkpoint; run the "
                 "same command again to resume")
    return failed

  def _note(self, message: str) -> None:
    with self._lock:
      self._out.write(f"[launch.local] {message}\n".encode())
      self._out.flush()


def run(command: Sequence[str], processes: int, devices_per_process: int, **kwargs) -> int:
  """Run `command` as `processes` emulated hosts; forwards SIGINT/SIGTERM while it runs
  (from the main thread). Returns the job's exit status."""
  job = LocalJob(command, processes, devices_per_process, **kwargs)
  handled = (signal.SIGINT, signal.SIGTERM)
  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, lambda signum, _: job.forward(signum)) for s in handled}
  try:
    return job.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m launch.local", description=__doc__.split("\n\n")[0],
      usage="python -m launch.local [--processes N] [--devices-per-process K] -- COMMAND ...")
  parser.add_argument("--processes", type=int, default=2, help="emulated hosts (default 2)")
  parser.add_argument("--devices-per-process", type=int, default=4,
                      help="CPU devices of each process (default 4)")
  parser.add_argument("--grace", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when a process failed")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--no-prefix", action="store_true", help="print lines without [i]")
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if not args.command:
    parser.error("no command: put it after --, e.g. -- python -m trainers.pretrain ...")
  return args


@exits.command("launch.local")
def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    return run(args.command, args.processes, args.devices_per_process, grace=args.grace,
               prefix=not args.no_prefix, port=args.port)
  except (ValueError, OSError) as e:  # the flags, or a command that cannot start
    raise exits.UsageError(exits.describe(e)) from e


if __name__ == "__main__":
  sys.exit(main())
