"""The training loop end to end on configs/tiny.py (8 emulated CPU devices, 64-token rows).

One straight run of 2N steps is the reference. A second workdir goes through a real
subprocess killed with SIGKILL after step N + 1 (checkpoint N committed), a second one that
resumes, gets SIGTERM before step N + 3 and saves, and a third that resumes to 2N: every
step's loss and the final train state (params, optimizer state, step, RNG) must equal the
straight run's, bit for bit. Step 3 of every run gets a NaN loss weight, so skipping and
reporting a non-finite step is on the path. The runs are subprocesses sharing a persistent
compilation cache, so only the first compiles.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as Device

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from configs.base import model_config
from gemma_jax import checkpoint, exits, metrics
from gemma_jax.model_dir import load_model_dir
from gemma_jax.optim import make_optimizer
from gemma_jax.train_state import RunLayout
from trainers import cli, hooks, loop, plot, pretrain

N = 8
TOTAL = 2 * N
NAN_STEP = 3
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def make_config(**eval_overrides):
  c = tiny.get_config()
  c.train.update(steps=TOTAL, seq_len=64)
  c.optimizer.update(learning_rate=1e-2, warmup_steps=2)
  c.eval.update({"every": 0, "batches": 1, **eval_overrides})
  c.checkpoint.update(every=N, keep=3)
  c.logging.every = 1
  return c


def inject_nan(trainer, batch):
  if trainer.step_count + 1 == NAN_STEP:
    batch = {**batch, "loss_weights": batch["loss_weights"].at[0, 0].set(jnp.nan)}
  return batch


TASK = dataclasses.replace(pretrain.TASK, hooks=(hooks.before_step(inject_nan),))


def driver(workdir: str, mode: str) -> None:
  """Runs in a subprocess. straight: the reference run (with evaluation); resume: run to the
  end; kill: wait for checkpoint N, say READY before step N + 2 and hang (the test sends
  SIGKILL); term: say READY before step N + 3 and wait for SIGTERM."""

  def hook(trainer, batch):
    if mode == "kill" and trainer.step_count == N + 1:
      trainer.checkpoints.wait()
      print("READY", flush=True)
      time.sleep(600)
    if mode == "term" and trainer.step_count == N + 2:
      print("READY", flush=True)
      assert trainer.stop_requested.wait(120)
    return inject_nan(trainer, batch)

  # Evaluation in the reference run only also shows that it leaves training untouched.
  config = make_config(every=N, sources=({"path": tiny.CORPUS},)) if mode == "straight" \
      else make_config()
  task = dataclasses.replace(TASK, hooks=(hooks.before_step(hook),))
  sys.exit(cli.report(task, loop.run(config, workdir, task)))  # the trainers' exit status


def run_driver(workdir: Path, mode: str, cache: Path, sig: int | None = None) -> tuple[int, str]:
  """Run `driver` in a subprocess; with `sig`, send it when the driver says READY. The
  subprocesses share a persistent compilation cache: only the first one compiles."""
  code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_trainer as t; " \
         "t.driver(sys.argv[1], sys.argv[2])"
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
  with open(workdir.parent / f"{mode}.stderr", "w+") as err:
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir), mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if sig is not None and line.strip() == "READY":
        proc.send_signal(sig)
        break
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=300)
    err.seek(0)
    assert sig is None or "READY\n" in lines, f"{mode} run ended early:\n{err.read()}"
    assert sig is not None or rc == 0, f"{mode} run failed:\n{err.read()}"
  return rc, "".join(lines)


@dataclasses.dataclass
class Run:
  workdir: Path
  losses: dict[int, float]
  state: object  # the final checkpoint's TrainState


def finished(workdir: Path) -> Run:
  config = make_config()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  abstract = RunLayout.build(model_config(config), make_optimizer(config.optimizer, TOTAL)[0],
                             mesh).abstract
  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=3)
  with jax.set_mesh(mesh):
    state = jax.device_get(ckpt.restore(TOTAL, abstract))
  return Run(workdir, dict(plot.read_metrics(workdir)["loss"]), state)


@pytest.fixture(scope="module", autouse=True)
def peak_cache(tmp_path_factory):
  """Keep the measured CPU peak out of ~/.cache (subprocesses read it from here too)."""
  directory = tmp_path_factory.mktemp("peak")
  old_cache, old_env = metrics._CACHE, os.environ.get("XDG_CACHE_HOME")
  metrics._CACHE, os.environ["XDG_CACHE_HOME"] = directory / "gemma_jax", str(directory)
  yield
  metrics._CACHE = old_cache
  if old_env is None:
    os.environ.pop("XDG_CACHE_HOME")
  else:
    os.environ["XDG_CACHE_HOME"] = old_env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("straight") / "w"
  run_driver(workdir, "straight", cache)
  return finished(workdir)


def test_loss_decreases_on_the_shipped_corpus(straight):
  losses = [straight.losses[s] for s in sorted(straight.losses)]
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  records = [json.loads(x) for x in (straight.workdir / metrics.METRICS_FILE).open()]
  nan_step = next(r for r in records if r["step"] == NAN_STEP)
  assert nan_step["loss"] is None and nan_step["skipped_steps"] == 1
  train_records = [r for r in records if "loss" in r and r["step"] > 1]
  assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in train_records)
  seen = [r["data_tokens/tokenizer_corpus"] for r in train_records]  # Per-source metrics.
  assert seen == sorted(seen) and seen[0] > 0
  assert train_records[-1]["data_epochs/tokenizer_corpus"] > 0
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 2 and evals[1] < evals[0]


def test_kill9_then_sigterm_then_resume_is_bit_exact(straight, cache, tmp_path):
  workdir = tmp_path / "w"
  rc, _ = run_driver(workdir, "kill", cache, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  killed = [json.loads(x) for x in (workdir / metrics.METRICS_FILE).open()]
  assert [r["step"] for r in killed] == list(range(1, N + 2))
  assert checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=3).steps() == [N]

  rc, out = run_driver(workdir, "term", cache, signal.SIGTERM)
  assert rc == exits.EXIT_PREEMPTED and f"SIGTERM: saved checkpoint step {N + 3}" in out, out
  assert checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=3).steps() == [N, N + 3]

  run_driver(workdir, "resume", cache)
  resumed = finished(workdir)
  assert resumed.losses == straight.losses  # every step, after the last record of each
  assert all(r["loss"] == straight.losses.get(r["step"]) for r in killed)
  jax.tree.map(np.testing.assert_array_equal, resumed.state, straight.state)


def test_restore_on_another_mesh_gives_the_same_next_loss(straight):
  config = make_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  trainer = loop.Trainer(config, straight.workdir, TASK)
  with jax.set_mesh(trainer.mesh):
    trainer.restore(N)
    loss = float(trainer.step()["loss"])
  assert trainer.state.params["embedder"]["input_embedding"].sharding.spec == \
      jax.sharding.PartitionSpec("tensor", "fsdp")
  assert loss == pytest.approx(straight.losses[N + 1], rel=1e-5)


def test_interrupted_or_damaged_newest_checkpoint_falls_back(straight, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(straight.workdir / "checkpoints", directory)
  # A save killed midway leaves orbax's temporary directory, never renamed into place.
  partial = directory / f"{TOTAL + N}.orbax-checkpoint-tmp-1234" / "params"
  partial.mkdir(parents=True)
  (partial / "junk").write_bytes(b"half")
  # The newest complete step then loses its array data (a damaged disk, a bad copy).
  for f in (directory / str(TOTAL) / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0" * 16)
  ckpt = checkpoint.TrainCheckpointer(directory, keep=3)
  assert ckpt.steps() == [N, TOTAL]
  config = make_config()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  abstract = RunLayout.build(model_config(config), make_optimizer(config.optimizer, TOTAL)[0],
                             mesh).abstract
  with jax.set_mesh(mesh):
    state = ckpt.restore_latest(abstract)
    want = ckpt.restore(N, abstract)
  assert int(state.step) == N
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(want))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_goes_on(straight, cache, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(straight.workdir, workdir, ignore=shutil.ignore_patterns(
      metrics.METRICS_FILE, "tensorboard"))
  arrays = max((f for f in (workdir / "checkpoints" / str(TOTAL) / "params").rglob("*")
                if f.is_file()), key=lambda f: f.stat().st_size)
  with open(arrays, "r+b") as f:  # the file of the array data, truncated
    f.truncate(arrays.stat().st_size // 2)
  run_driver(workdir, "resume", cache)  # before the fix: StepAlreadyExistsError at TOTAL
  warnings = [line for line in (tmp_path / "resume.stderr").read_text().splitlines()
              if "set aside" in line]
  assert len(warnings) == 1 and f"set aside as {TOTAL}.damaged, resuming from step {N}" in \
      warnings[0], warnings
  steps = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=3).steps()
  assert steps == [N, TOTAL] and (workdir / "checkpoints" / f"{TOTAL}.damaged").is_dir()
  resumed = finished(workdir)
  assert resumed.losses == {s: v for s, v in straight.losses.items() if s > N}
  jax.tree.map(np.testing.assert_array_equal, resumed.state, straight.state)


def test_workdir_loads_like_a_model_directory(straight):
  cfg, model, tokenizer = load_model_dir(straight.workdir)
  assert cfg == model_config(make_config())
  assert tokenizer == straight.workdir / "tokenizer.model"
  params = jax.device_get(nnx.state(model, nnx.Param).to_pure_dict())
  jax.tree.map(np.testing.assert_array_equal, params, straight.state.params)
  _, older, _ = load_model_dir(straight.workdir, step=N)
  assert not np.array_equal(older.embedder.input_embedding[...],
                            model.embedder.input_embedding[...])


def _tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
  """Decode the TFRecord event files (length, crc, Event proto, crc) without TensorFlow."""
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for path in directory.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_tensorboard_and_plot(straight, tmp_path):
  scalars = _tensorboard_scalars(straight.workdir / metrics.TENSORBOARD_DIR)
  assert dict(scalars["loss"]) == pytest.approx(straight.losses)
  assert {"perplexity", "grad_norm", "learning_rate", "tokens_per_s", "mfu",
          "eval_loss"} <= set(scalars)
  assert plot.main([str(straight.workdir), "--out", str(tmp_path / "loss.png")]) == 0
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_policy():
  values = {"loss": math.nan, "grad_norm": 1.0}
  hooks.report_non_finite(7, values, "skip", 1, 5)
  with pytest.raises(hooks.NonFiniteError, match="step 7.*non_finite='stop'"):
    hooks.report_non_finite(7, values, "stop", 1, 5)


def test_init_from_a_model_directory(straight, tmp_path):
  config = make_config()
  config.init_from = str(straight.workdir)  # a workdir loads like a model directory
  trainer = loop.Trainer(config, tmp_path / "w", TASK)
  with jax.set_mesh(trainer.mesh):
    assert trainer.init_state() == f"params from {straight.workdir}"
  state = jax.device_get(trainer.state)
  jax.tree.map(np.testing.assert_array_equal, state.params, straight.state.params)
  assert state.step == 0
  assert all(not x.any() for x in jax.tree.leaves(state.opt_state))  # fresh AdamW moments


def test_peak_flops_per_device_kind():
  assert metrics.peak_flops_per_device(Device(platform="tpu", device_kind="TPU v5 lite")) == 197e12
  assert metrics.peak_flops_per_device(Device(platform="tpu", device_kind="TPU v5p")) == 459e12
  assert metrics.peak_flops_per_device(
      Device(platform="gpu", device_kind="NVIDIA H100 PCIe")) == 756e12
  assert metrics.peak_flops_per_device(Device(platform="gpu", device_kind="Some GPU")) is None
