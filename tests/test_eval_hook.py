"""config.eval.tasks in the training loop: the tasks' metrics logged beside the held-out loss
at every eval.every steps, equal to gemma_jax.eval on the saved model; bad task names stop
the run at start-up naming the key."""

import json

import pytest

from configs import tiny
from configs.base import ConfigError, validate
from gemma_jax.eval import Evaluator, load_task
from gemma_jax.model_dir import load_model_dir
from gemma_jax.tokenizer import Tokenizer
from trainers import loop, pretrain


def make_config(tmp_path, **eval_overrides):
  c = tiny.get_config()
  c.train.update(steps=4, seq_len=64)
  c.optimizer.warmup_steps = 1
  c.eval.update({"every": 2, "batches": 1, "tasks": ("word_completion", "prose_perplexity"),
                 "task_limit": 3, **eval_overrides})
  c.checkpoint.update(every=4, async_save=False)
  c.logging.update(every=2, tensorboard=False)
  return c


@pytest.mark.slow  # a training run with tasks, ~25 s
def test_task_metrics_are_logged_with_the_eval_loss(tmp_path):
  c = make_config(tmp_path)
  workdir = tmp_path / "run"
  loop.Trainer(c, workdir, pretrain.TASK).train()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "eval_word_completion_acc" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert any("eval_loss" in r for r in records)
  _, model, tokenizer = load_model_dir(workdir)
  ev = Evaluator(model, Tokenizer(tokenizer), max_length=64, progress=False)
  want = {**{f"eval_word_completion_{k}": v for k, v in
             ev.run(load_task("word_completion"), 3).items()},
          **{f"eval_prose_perplexity_{k}": v for k, v in
             ev.run(load_task("prose_perplexity"), 3).items()}}
  last = {k: v for r in records if r["step"] == 4 for k, v in r.items()}
  for key in ("eval_word_completion_acc", "eval_word_completion_acc_norm",
              "eval_prose_perplexity_bits_per_byte"):
    assert last[key] == pytest.approx(want[key], rel=1e-4), key


def test_unknown_task_is_a_config_error(tmp_path):
  c = make_config(tmp_path, tasks=("no_such_task",))
  with pytest.raises(ConfigError, match="config.eval.tasks: task 'no_such_task'"):
    validate(c, 8)
