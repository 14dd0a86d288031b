"""Every trainer (DPO and GRPO too) and the sampler as 2 emulated hosts: launch.local runs
2 processes x 4 CPU devices (gloo collectives), compared with 1 process x 8 devices (this
pytest process).

Data: the rl format has one prompt per row, and the sft / reward runs use packing "none"
with truncation, so both layouts see the same records in every global batch (each process
is dealt every other record). RLHF seeds a completion by its prompt's place in the batch's
record order, so both layouts sample the same completions.

Tolerance: the two layouts run the same per-row programs, but the processes' all-reduces
(gloo) add in another order than XLA:CPU's in-process ones, which moves float32 results in
about the 7th digit (1e-7 relative per reduction, seen up to 1e-6 on KL). The RLOO loss is a
small sum of terms of both signs (advantages have mean zero), which amplifies that: up to
5e-6 relative was seen. So: completion lengths exactly equal, everything else within
rtol 1e-5, the RLOO loss within 1e-4.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from jobs import kill_one_after, run_job

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS, CHECKPOINT = 6, 3
COMMON = [f"--config.train.steps={STEPS}", "--config.logging.every=1",
          "--config.logging.tensorboard=False",
          f"--config.checkpoint.every={CHECKPOINT}", "--config.checkpoint.keep=5"]
RLHF = ["--config", str(ROOT / "configs" / "rlhf_tiny.py")]
ONE_RECORD_PER_ROW = ["--config.data.packing=none", "--config.data.truncate_long=True"]
RL_KEYS = ("reward_mean", "reward_std", "shaped_reward_mean", "kl", "entropy", "grad_norm")


def argv(trainer: str, workdir: Path, *args: str) -> list[str]:
  return [trainer, *args, *COMMON, "--workdir", str(workdir)]


def run_one(trainer: str, workdir: Path, *args: str) -> dict[int, dict]:
  """The reference: 1 process x 8 devices (this process), metrics per step."""
  import importlib

  from trainers import cli

  task = importlib.import_module(f"trainers.{trainer}").TASK
  assert cli.main(task, argv(trainer, workdir, *args)) == 0
  return metrics(workdir)


def command(trainer: str, workdir: Path, *args: str) -> list[str]:
  return [sys.executable, "-m", f"trainers.{trainer}", *argv(trainer, workdir, *args)[1:]]


def metrics(workdir: Path) -> dict[int, dict]:
  """{step: every metric logged at it}; a step logged again after a resume keeps the last."""
  out: dict[int, dict] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out.setdefault(record["step"], {}).update(record)
  return out


def assert_same_steps(got: dict, want: dict, keys, rtol: float = 1e-5, **rtols) -> None:
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for key in keys:
    np.testing.assert_allclose([got[s][key] for s in sorted(got)],
                               [want[s][key] for s in sorted(want)],
                               rtol=rtols.get(key, rtol), err_msg=key)


# -- RLHF with reward_fn: equality, a SIGKILL, an exact resume ---------------------------------

@pytest.fixture(scope="module")
def rlhf_one(tmp_path_factory) -> dict:
  return run_one("rlhf", tmp_path_factory.mktemp("rlhf_one"), *RLHF)


@pytest.fixture(scope="module")
def rlhf_killed_and_resumed(tmp_path_factory) -> dict:
  """A 2 x 4 RLHF run whose process 1 is SIGKILLed once step 4 is logged (checkpoint 3
  exists), then the same command again, resuming."""
  workdir = tmp_path_factory.mktemp("rlhf_two")
  out = kill_one_after(command("rlhf", workdir, *RLHF), workdir, CHECKPOINT)
  out["before"] = metrics(workdir) if (workdir / "metrics.jsonl").is_file() else {}
  out["resume_status"], out["resume_output"] = run_job(command("rlhf", workdir, *RLHF))
  out["after"] = metrics(workdir)
  return out


def test_rlhf_kill_of_one_host_stops_both(rlhf_killed_and_resumed):
  run = rlhf_killed_and_resumed
  assert run["before"] and max(run["before"]) < STEPS, "the job ended before the kill"
  assert run["kill_status"] == 128 + signal.SIGKILL and run["stop_seconds"] < 60


def test_rlhf_on_two_hosts_equals_one(rlhf_one, rlhf_killed_and_resumed):
  run = rlhf_killed_and_resumed
  assert run["resume_status"] == 0, run["resume_output"][-3000:]
  got = run["after"]
  assert [got[s]["completion_length"] for s in sorted(got)] == \
      [rlhf_one[s]["completion_length"] for s in sorted(rlhf_one)]
  assert_same_steps(got, rlhf_one, (*RL_KEYS, "loss"), loss=1e-4)


def test_rlhf_resume_on_two_hosts_repeats_the_steps_exactly(rlhf_killed_and_resumed):
  run = rlhf_killed_and_resumed
  assert f"resumed from checkpoint step {CHECKPOINT}" in run["resume_output"]
  overlap = [s for s in run["before"] if s > CHECKPOINT]
  assert overlap, "the interrupted run logged no step after its checkpoint"
  for step in overlap:
    for key in (*RL_KEYS, "loss", "completion_length"):
      assert run["before"][step][key] == run["after"][step][key], (step, key)


@pytest.mark.parametrize("reward_fn, message", [
    ("wrong_count_on_process_1", "returned 15 scores for 16 completions"),
    pytest.param("nan_on_process_1", "returned a non-finite score (nan)",
                 marks=pytest.mark.slow)])
def test_a_bad_reward_on_one_host_stops_every_host(tmp_path, monkeypatch, reward_fn, message):
  monkeypatch.setenv("PYTHONPATH", str(TESTS))
  spec = f"faulty_rewards:{reward_fn}"
  start = time.monotonic()
  status, text = run_job(command("rlhf", tmp_path, *RLHF, f"--config.rlhf.reward_fn={spec}"))
  assert status == 2, text[-3000:]
  for i in range(2):
    assert f"[{i}] config error: process 1: config.rlhf.reward_fn={spec!r} {message}" in text
  assert "Traceback" not in text and time.monotonic() - start < 300


# -- the reward trainer, SFT, and RLHF with a reward model and LoRA --------------------------

REWARD = ["--config", str(ROOT / "configs" / "reward_tiny.py"), "--config.eval.every=0",
          "--config.optimizer.warmup_steps=2", *ONE_RECORD_PER_ROW]


@pytest.fixture(scope="module")
def reward_one(tmp_path_factory) -> tuple[Path, dict]:
  workdir = tmp_path_factory.mktemp("reward_one")
  return workdir, run_one("reward", workdir, *REWARD)


@pytest.mark.slow
def test_reward_trainer_on_two_hosts_equals_one(reward_one, tmp_path):
  status, text = run_job(command("reward", tmp_path, *REWARD))
  assert status == 0, text[-3000:]
  assert_same_steps(metrics(tmp_path), reward_one[1], ("loss", "accuracy", "margin",
                                                       "grad_norm"))


@pytest.mark.slow
def test_sft_on_two_hosts_equals_one(tmp_path):
  # No LoRA dropout: its masks follow a row's place in the global batch, which differs
  # between the layouts (each host's rows are one block of it).
  sft = ["--config", str(ROOT / "configs" / "sft_tiny.py"), "--config.eval.every=3",
         "--config.samples.every=0", "--config.optimizer.warmup_steps=2",
         "--config.lora.dropout=0.0", *ONE_RECORD_PER_ROW]
  want = run_one("sft", tmp_path / "one", *sft)
  status, text = run_job(command("sft", tmp_path / "two", *sft))
  assert status == 0, text[-3000:]
  got = metrics(tmp_path / "two")
  assert_same_steps(got, want, ("loss", "grad_norm"))
  assert [got[s]["eval_loss"] for s in (3, 6)] == pytest.approx(
      [want[s]["eval_loss"] for s in (3, 6)], rel=1e-5)


@pytest.mark.slow
def test_rlhf_with_a_reward_model_and_lora_on_two_hosts_equals_one(reward_one, tmp_path):
  args = [*RLHF, "--config.rlhf.reward_fn=", f"--config.rlhf.reward_model={reward_one[0]}",
          "--config.lora.rank=4"]
  want = run_one("rlhf", tmp_path / "one", *args)
  status, text = run_job(command("rlhf", tmp_path / "two", *args))
  assert status == 0, text[-3000:]
  got = metrics(tmp_path / "two")
  assert [got[s]["completion_length"] for s in sorted(got)] == \
      [want[s]["completion_length"] for s in sorted(want)]
  assert_same_steps(got, want, (*RL_KEYS, "loss"), loss=1e-4)


# -- DPO and GRPO ------------------------------------------------------------------------------

@pytest.mark.slow
def test_dpo_on_two_hosts_equals_one(tmp_path):
  """LoRA DPO with held-out evaluation: the reference log-probs are computed on the global
  mesh from every host's pair rows."""
  args = ["--config", str(ROOT / "configs" / "dpo_tiny.py"), "--config.eval.every=3",
          "--config.eval.batches=1", "--config.optimizer.warmup_steps=2",
          "--config.lora.rank=4", *ONE_RECORD_PER_ROW]
  want = run_one("dpo", tmp_path / "one", *args)
  status, text = run_job(command("dpo", tmp_path / "two", *args))
  assert status == 0, text[-3000:]
  got = metrics(tmp_path / "two")
  assert_same_steps(got, want, ("loss", "reward_accuracy", "reward_margin", "chosen_reward",
                                "grad_norm"))
  for step in (3, 6):
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_grpo_on_two_hosts_equals_one(tmp_path):
  """Rollout cycles of 3 minibatch steps (24 rows, 8 per minibatch: one per device): each
  host's rows of the buffer stay on its devices, and 2 x 4 gives 1 x 8's numbers."""
  args = [*RLHF, "--config.rlhf.algorithm=grpo", "--config.rlhf.kl=loss", "--config.rlhf.k=3",
          "--config.rlhf.minibatches=3", "--config.rlhf.updates_per_rollout=1"]
  want = run_one("rlhf", tmp_path / "one", *args)
  status, text = run_job(command("rlhf", tmp_path / "two", *args))
  assert status == 0, text[-3000:]
  got = metrics(tmp_path / "two")
  assert [got[s].get("completion_length") for s in sorted(got)] == \
      [want[s].get("completion_length") for s in sorted(want)]
  assert_same_steps(got, want, ("loss", "grad_norm", "ratio", "kl_k3"), loss=1e-4)
  for step in (1, 4):  # the rollouts
    for key in RL_KEYS[:5]:
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=key)


# -- generation on a model sharded over two hosts ----------------------------------------------

def test_generate_on_two_hosts_equals_one_device(tmp_path, capsys):
  from gemma_jax import generate
  from gemma_jax.checkpoint import save_model_dir
  from gemma_jax.config import get_config
  from gemma_jax.model import init_model
  from gemma_jax.tokenizer import train_sentencepiece

  spm = train_sentencepiece([TESTS / "data" / "tokenizer_corpus.txt"], tmp_path / "spm", 512)
  cfg = get_config("tiny_gemma3", dtype="float32")
  model_dir = save_model_dir(tmp_path / "model", cfg, init_model(cfg, seed=2),
                             tokenizer_model=spm)
  args = ["--checkpoint", str(model_dir), "--prompt", "The baker", "--prompt", "Yeast feeds",
          "--prompt", "Bread rises when", "--max_new_tokens", "6", "--temperature", "0.8",
          "--seed", "3", "--json"]
  assert generate.main(args) == 0  # one device
  want = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  status, text = run_job([sys.executable, "-m", "gemma_jax.generate", *args,
                          "--mesh", "data=2,fsdp=4"])
  assert status == 0, text[-3000:]
  got = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("[0] {")]
  assert not any(line.startswith("[1] {") for line in text.splitlines())  # process 0 prints
  assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
  assert [g["text"] for g in got] == [w["text"] for w in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["logprobs"], w["logprobs"], atol=1e-4)
