"""Running launch.local jobs from tests: a job's status and output, and a job whose process 1
is SIGKILLed once a checkpoint exists and a later step is logged."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from launch import local


def run_job(command: list[str], processes: int = 2, devices: int = 4,
            **kwargs) -> tuple[int, str]:
  """(exit status, the prefixed output) of `command` as processes x devices."""
  path = Path(os.environ.get("TMPDIR", "/tmp")) / f"launch-local-{os.getpid()}-{time.time_ns()}"
  with open(path, "w+b") as out:
    status = local.LocalJob(command, processes, devices, out=out, **kwargs).wait()
    out.seek(0)
    text = out.read().decode(errors="replace")
  path.unlink()
  return status, text


def kill_one_after(command: list[str], workdir: Path, checkpoint: int,
                   timeout: float = 600) -> dict:
  """Run `command` as 2 x 4 and SIGKILL process 1 once checkpoint `checkpoint` is written and
  a step after it is logged: {kill_status, stop_seconds, returncodes} (the launcher's status,
  the seconds the others took to stop, every process's return code)."""
  sink = open(os.devnull, "wb")  # noqa: SIM115 -- the job writes to it until wait() returns
  job = local.LocalJob(command, 2, 4, grace=3, out=sink)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and all(p.poll() is None for p in job.procs) and not (
      metrics.is_file() and len(metrics.read_text().splitlines()) > checkpoint
      and (workdir / "checkpoints" / str(checkpoint)).is_dir()):
    time.sleep(0.05)
  os.kill(job.procs[1].pid, signal.SIGKILL)
  killed = time.monotonic()
  status = job.wait()
  sink.close()
  return {"kill_status": status, "stop_seconds": time.monotonic() - killed,
          "returncodes": [p.returncode for p in job.procs]}
