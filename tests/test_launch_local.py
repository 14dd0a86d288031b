"""Multi-host emulation: launch.local runs N processes with CPU devices and gloo collectives.

The training tests compare 2 processes x 4 devices with 1 process x 8 devices. Batches are
made with packing "none" and truncation, so every record is one row: then both layouts see
the same rows in every global batch (each process reads every other record), and the losses
agree to float rounding. Each run trains the tiny model for 6 steps, checkpointing every 3.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemma_jax import distributed, exits
from jobs import kill_one_after, run_job
from launch import local

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
CHECKPOINT = 3  # every 3 steps: the kill comes after step 4, the resume starts at 3
TRAIN_ARGS = [
    "--config", str(ROOT / "configs" / "tiny.py"),
    f"--config.train.steps={STEPS}", "--config.train.seq_len=64",
    "--config.optimizer.warmup_steps=2", "--config.logging.every=1",
    "--config.logging.tensorboard=False", "--config.eval.every=0",
    f"--config.checkpoint.every={CHECKPOINT}", "--config.checkpoint.keep=5",
    "--config.data.packing=none", "--config.data.truncate_long=True",
]


def _train_command(workdir: Path) -> list[str]:
  return [sys.executable, "-m", "trainers.pretrain", *TRAIN_ARGS, "--workdir", str(workdir)]


def _losses(workdir: Path) -> dict[int, tuple[float, float]]:
  """{step: (loss, grad_norm)} from metrics.jsonl; a step logged again after a resume keeps
  its last value."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    out[m["step"]] = (m["loss"], m["grad_norm"])
  return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[int, tuple[float, float]]:
  """The reference: 1 process x 8 devices (this pytest process), losses per step."""
  from trainers import cli, loop, pretrain

  workdir = tmp_path_factory.mktemp("one_process")
  config, _, _ = cli.parse(["pretrain", *TRAIN_ARGS, "--workdir", str(workdir)])
  assert loop.run(config, workdir, pretrain.TASK)["step"] == STEPS
  return _losses(workdir)


# -- the launcher alone (no JAX in the children) --------------------------------------------------

def test_process_env_sets_devices_and_coordinator():
  env = local.process_env(1, 2, 4, "127.0.0.1:1234",
                          base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  assert (env["JAX_PLATFORMS"], env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"],
          env["JAX_PROCESS_ID"]) == ("cpu", "127.0.0.1:1234", "2", "1")
  assert distributed.env_settings(env) == {"coordinator_address": "127.0.0.1:1234",
                                           "num_processes": 2, "process_id": 1}


def test_env_settings_name_what_is_missing():
  assert distributed.env_settings({}) is None
  with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID not set"):
    distributed.env_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(distributed.DistributedError, match=r"JAX_PROCESS_ID=2 is not in \[0"):
    distributed.env_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": "2"})


def test_outputs_are_prefixed_and_success_is_zero():
  code = "import os; print('id', os.environ['JAX_PROCESS_ID'], os.environ['XLA_FLAGS'])"
  status, text = run_job([sys.executable, "-c", code], processes=3, devices=2)
  assert status == 0
  lines = text.splitlines()
  for i in range(3):
    mine = [line for line in lines if line.startswith(f"[{i}] id {i} ")]
    assert len(mine) == 1 and mine[0].endswith("--xla_force_host_platform_device_count=2")


def test_one_failure_stops_the_others():
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(120)\n")
  start = time.monotonic()
  status, text = run_job([sys.executable, "-c", code], processes=3, devices=1, grace=2)
  assert status == 3
  assert time.monotonic() - start < 30
  assert "exited with status 3: stopping the others" in text


def test_a_preempted_process_is_no_failure_and_the_job_says_it_can_resume():
  # Process 1 saves and exits 75 at once; process 0 takes longer and must not be stopped.
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '0': time.sleep(3); print('saved', flush=True)\n"
          "sys.exit(75)\n")
  status, text = run_job([sys.executable, "-c", code], processes=2, devices=1, grace=0.5)
  assert status == exits.EXIT_PREEMPTED and "[0] saved" in text, text
  assert "stopping the others" not in text and "preempted (status 75)" in text, text


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period():
  code = ("import os, signal, sys, time\n"
          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "if os.environ['JAX_PROCESS_ID'] == '0': time.sleep(0.5); sys.exit(1)\n"
          "time.sleep(120)\n")
  start = time.monotonic()
  status, _ = run_job([sys.executable, "-c", code], processes=2, devices=1, grace=1)
  assert status == 1 and time.monotonic() - start < 30


def test_signals_are_forwarded_to_every_process():
  code = ("import os, signal, sys, time\n"
          "def on_term(*_):\n"
          "  print('process', os.environ['JAX_PROCESS_ID'], 'got SIGTERM', flush=True)\n"
          "  sys.exit(0)\n"
          "signal.signal(signal.SIGTERM, on_term)\n"
          "print('ready', flush=True)\n"
          "time.sleep(120)\n")
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "1",
       "--", sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  lines = []
  while sum("ready" in line for line in lines) < 2:
    lines.append(launcher.stdout.readline())
  launcher.send_signal(signal.SIGTERM)
  rest, _ = launcher.communicate(timeout=60)
  assert launcher.returncode == 0
  assert "[0] process 0 got SIGTERM" in rest and "[1] process 1 got SIGTERM" in rest


def test_command_line_needs_a_command():
  with pytest.raises(SystemExit):
    local.parse_args(["--processes", "2"])
  args = local.parse_args(["--processes", "3", "--", "python", "-c", "pass"])
  assert (args.processes, args.devices_per_process, args.command) == (3, 4,
                                                                       ["python", "-c", "pass"])


def test_processes_join_one_job_and_dcn_splits_them():
  """The children join from launch.local's environment alone; a DCN axis of 2 (multi-slice)
  puts one process's devices on each side of it, and the batch layout checks pass."""
  code = ("from gemma_jax import distributed, sharding\n"
          "assert distributed.initialize()\n"
          "import jax\n"
          "for cfg in (dict(data=1, fsdp=-1, tensor=1),\n"
          "            dict(data=1, fsdp=2, tensor=2, dcn_data=2)):\n"
          "  mesh = sharding.make_mesh(cfg)\n"
          "  procs = [[d.process_index for d in row.flat] for row in mesh.devices]\n"
          "  print(jax.process_index(), jax.device_count(), dict(mesh.shape), procs)\n")
  status, text = run_job([sys.executable, "-c", code], processes=2, devices=4)
  assert status == 0, text
  for i in range(2):
    assert (f"[{i}] {i} 8 {{'data': 1, 'fsdp': 8, 'tensor': 1}} "
            "[[0, 0, 0, 0, 1, 1, 1, 1]]") in text
    assert (f"[{i}] {i} 8 {{'data': 2, 'fsdp': 2, 'tensor': 2}} "
            "[[0, 0, 0, 0], [1, 1, 1, 1]]") in text


# -- training as 2 emulated hosts ---------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> dict:
  """A 2 x 4 run whose process 1 is SIGKILLed after step 4 (a checkpoint at step 3 exists),
  then the same command again, resuming. Three runs in all with the reference: this file's
  time budget allows no separate uninterrupted 2 x 4 run; the steps logged before the kill
  are that run (see the docstrings of the tests)."""
  workdir = tmp_path_factory.mktemp("two_processes")
  out = kill_one_after(_train_command(workdir), workdir, CHECKPOINT)
  metrics = workdir / "metrics.jsonl"
  out["metrics_lines"] = metrics.read_text().splitlines() if metrics.is_file() else []
  out["before"] = _losses(workdir) if metrics.is_file() else {}
  out["data_files"] = sorted(
      p.name for p in (workdir / "checkpoints" / str(CHECKPOINT) / "data").glob("*.json"))
  out["resume_status"], out["resume_output"] = run_job(_train_command(workdir))
  out["after"] = _losses(workdir)
  out["leftovers"] = list(workdir.glob(".shared-check-*"))
  return out


def test_killing_one_process_stops_all(killed_and_resumed):
  run = killed_and_resumed
  assert run["before"] and max(run["before"]) < STEPS, \
      "the job ended before the kill: nothing was interrupted"
  assert run["kill_status"] == 128 + signal.SIGKILL
  assert None not in run["returncodes"] and run["returncodes"][0] != 0
  assert run["stop_seconds"] < 60


def test_two_processes_train_like_one(one_process, killed_and_resumed):
  """2 x 4 devices with gloo give 1 x 8's losses and gradient norms at every step (steps
  up to the kill from the interrupted run, the rest from the resumed one)."""
  run = killed_and_resumed
  assert run["resume_status"] == 0, run["resume_output"][-3000:]
  losses = run["after"]
  assert sorted(losses) == sorted(one_process) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [one_process[s] for s in sorted(one_process)], rtol=2e-5)
  # Only process 0 writes metrics (one line per step before the kill); each process saved
  # its own data-iterator position.
  steps = [json.loads(line)["step"] for line in run["metrics_lines"]]
  assert steps == sorted(set(steps))
  assert run["data_files"] == ["process_0-of-2.json", "process_1-of-2.json"]
  assert not run["leftovers"]


def test_resume_with_two_processes_continues_identically(killed_and_resumed):
  """Steps after the checkpoint (step 3) that the interrupted run had logged are logged
  again by the resumed run, bit for bit: it continues exactly as the run would have."""
  run = killed_and_resumed
  assert f"resumed from checkpoint step {CHECKPOINT}" in run["resume_output"]
  before, after = run["before"], run["after"]
  overlap = [s for s in before if s > CHECKPOINT]
  assert overlap, "the interrupted run logged no step after its checkpoint"
  assert {s: before[s] for s in overlap} == {s: after[s] for s in overlap}
