"""launch.tpu_vm builds its gcloud commands as data; these tests check them (no gcloud runs)."""

from __future__ import annotations

import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from launch import libtpu_flags, tpu_vm

ROOT = Path(__file__).resolve().parents[1]
SCOPE = ["--name", "gemma", "--zone", "us-west4-a", "--project", "proj"]
TRAIN = ["--", "python", "-m", "trainers.pretrain", "--config", "configs/gemma_2b.py",
         "--workdir", "/mnt/ckpt/gemma_2b", "--config.tokenizer.path=/mnt/data/tokenizer.model",
         "--config.data.sources=({'path': '/mnt/data/*.array_record'},)"]


def _plan(*argv: str) -> list[list[str]]:
  return tpu_vm.plan(tpu_vm.parse_args(list(argv)), archive="/tmp/code.tar.gz")


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
  """Nothing here may reach gcloud (or git, except where a test allows it)."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"a command was run: {args}")
  for name in ("call", "run", "Popen", "check_call", "check_output"):
    monkeypatch.setattr(subprocess, name, refuse)


def test_single_slice_commands():
  assert _plan("create", *SCOPE) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "gemma", "--zone=us-west4-a",
      "--project=proj", "--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite"]]
  setup = _plan("setup", *SCOPE)
  assert setup[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/code.tar.gz",
                      "gemma:~/gemma-jax.tar.gz", "--zone=us-west4-a", "--project=proj",
                      "--worker=all"]
  assert setup[1][:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gemma",
                          "--zone=us-west4-a", "--project=proj", "--worker=all"]
  assert "tar -xzf ~/gemma-jax.tar.gz -C ~/gemma-jax && cd ~/gemma-jax && " in setup[1][9]
  assert setup[1][9].endswith(tpu_vm.INSTALL)

  (run,) = _plan("run", *SCOPE, "--env", "TPU_STDERR_LOG_LEVEL=0", *TRAIN)
  assert run[:9] == setup[1][:9]
  remote = run[9].removeprefix("--command=")
  assert shlex.split(remote) == [
      "cd", "~/gemma-jax", "&&", "exec", "env", "PYTHONUNBUFFERED=1",
      f"LIBTPU_INIT_ARGS={libtpu_flags.DEFAULT}", "TPU_STDERR_LOG_LEVEL=0", ".venv/bin/python", "-m", "trainers.pretrain", "--config", "configs/gemma_2b.py",
      "--workdir", "/mnt/ckpt/gemma_2b", "--config.tokenizer.path=/mnt/data/tokenizer.model",
      "--config.data.sources=({'path': '/mnt/data/*.array_record'},)", "--distributed"]

  assert _plan("delete", *SCOPE) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "gemma", "--zone=us-west4-a",
      "--project=proj", "--quiet"]]


def test_libtpu_flags_are_the_default_and_can_be_replaced():
  def libtpu_env(*env):
    (run,) = _plan("run", *SCOPE, *env, *TRAIN)
    words = shlex.split(run[-1].removeprefix("--command="))
    return [w for w in words if w.startswith("LIBTPU_INIT_ARGS=")]
  assert libtpu_env() == [f"LIBTPU_INIT_ARGS={libtpu_flags.DEFAULT}"]
  assert "--xla_tpu_overlap_compute_collective_tc=true" in libtpu_flags.FLAGS
  assert libtpu_env("--env", "LIBTPU_INIT_ARGS=--xla_x=1") == ["LIBTPU_INIT_ARGS=--xla_x=1"]
  assert libtpu_env("--env", "LIBTPU_INIT_ARGS=") == ["LIBTPU_INIT_ARGS="]


def test_multi_slice_commands():
  multi = [*SCOPE, "--slices", "2", "--accelerator-type", "v5litepod-256", "--spot"]
  assert _plan("create", *multi) == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "gemma", "--zone=us-west4-a",
      "--project=proj", "--accelerator-type=v5litepod-256",
      "--runtime-version=v2-alpha-tpuv5-lite", "--node-count=2", "--node-prefix=gemma", "--spot"]]
  setup = _plan("setup", *multi)
  assert [c[5:7] for c in setup[:2]] == [["/tmp/code.tar.gz", "gemma-0:~/gemma-jax.tar.gz"],
                                         ["/tmp/code.tar.gz", "gemma-1:~/gemma-jax.tar.gz"]]
  assert setup[2][:10] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "gemma",
                           "--zone=us-west4-a", "--project=proj", "--node=all", "--worker=all"]

  (run,) = _plan("run", *multi, "--detach", *TRAIN)
  assert run[:10] == setup[2][:10]
  remote = shlex.split(run[10].removeprefix("--command="))
  # The slices become the mesh's DCN data axis; the job runs under nohup with a pid file.
  assert remote[:4] == ["cd", "~/gemma-jax", "&&", "nohup"]
  assert remote[-12:] == ["--distributed", "--config.mesh.dcn_data=2", ">", "run.log", "2>&1",
                          "<", "/dev/null", "&", "echo", "$!", ">", "run.pid"]
  (explicit,) = _plan("run", *multi, *TRAIN, "--config.mesh.dcn_fsdp=2")
  assert "dcn_data" not in explicit[10]

  (logs,) = _plan("logs", *multi)
  assert logs[8:11] == ["--node=0", "--worker=0",
                        "--command=tail -n +1 -F ~/gemma-jax/run.log"]
  (stop,) = _plan("stop", *multi)
  assert stop[-1] == "--command=kill -TERM $(cat ~/gemma-jax/run.pid)"
  assert _plan("delete", *multi) == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "gemma", "--zone=us-west4-a",
      "--project=proj", "--force", "--quiet"]]
  assert _plan("status", *multi)[0][-1] == "--format=value(state.state)"


def test_queued_single_slice_and_git_source():
  (create,) = _plan("create", *SCOPE, "--queued", "--reserved")
  assert create[3:5] == ["queued-resources", "create"]
  assert create[-2:] == ["--node-id=gemma", "--reserved"]
  (setup,) = _plan("setup", *SCOPE, "--source", "git+https://example.com/gemma-jax.git@v1")
  assert "git clone -q https://example.com/gemma-jax.git ~/gemma-jax" in setup[-1]
  assert "git fetch -q --depth=1 origin v1 && git checkout -q FETCH_HEAD" in setup[-1]


def test_dry_run_prints_and_runs_nothing(capsys):
  assert tpu_vm.main(["run", *SCOPE, "--slices", "4", "--dry-run", *TRAIN]) == 0
  (line,) = capsys.readouterr().out.splitlines()
  assert shlex.split(line)[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
  assert "--config.mesh.dcn_data=4" in line


def test_errors_name_the_flag(capsys):
  assert tpu_vm.main(["create", *SCOPE, "--accelerator-type", "v9-8", "--dry-run"]) == 2
  assert "--accelerator-type=v9-8" in capsys.readouterr().err
  assert tpu_vm.main(["run", *SCOPE, "--dry-run"]) == 2
  assert "no command" in capsys.readouterr().err
  assert tpu_vm.main(["run", *SCOPE, "--env", "NOVALUE", "--dry-run", *TRAIN]) == 2
  assert "--env 'NOVALUE'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    tpu_vm.parse_args(["create", *SCOPE, "--", "python"])


def test_pack_checkout_holds_the_code_not_the_venv(tmp_path, monkeypatch):
  monkeypatch.undo()  # git ls-files is allowed here
  archive = tpu_vm.pack_checkout(ROOT, tmp_path / "code.tar.gz")
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
  assert {"launch/tpu_vm.py", "trainers/pretrain.py", "configs/gemma_2b.py",
          "pyproject.toml"} <= names
  assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_a_preempted_run_is_reported_as_resumable(monkeypatch, capsys):
  statuses = {"run": 75, "stop": 0}
  for action, status in statuses.items():
    monkeypatch.setattr(tpu_vm.subprocess, "call", lambda command, s=status: s)
    argv = [action, *SCOPE, *(TRAIN if action == "run" else [])]
    assert tpu_vm.main(argv) == status
  err = capsys.readouterr().err
  assert err.count("preempted") == 1 and "`run` the same command again to resume" in err, err
