"""The RLHF trainer end to end on configs/rlhf_tiny.py: the demo's mean reward rises while
the KL stays bounded (the CLI on one device), and on 8 emulated CPU devices a stopped and
resumed run continues bit-exactly, with the reference the starting policy (KL exactly 0 on
the first rollout). Reward-model scoring and LoRA: test_rlhf_variants.py."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import rlhf_tiny
from configs.base import ConfigError
from gemma_jax import metrics
from trainers import hooks, loop, plot, rlhf

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def caches(tmp_path_factory):
  """Keep the measured CPU peak out of ~/.cache, and share compilations between the runs of
  this module (every Trainer jits its own functions) through a persistent cache."""
  directory = tmp_path_factory.mktemp("caches")
  old = metrics._CACHE
  metrics._CACHE = directory / "gemma_jax"
  options = {"jax_compilation_cache_dir": str(directory / "jax"),
             "jax_persistent_cache_min_compile_time_secs": 0.0,
             "jax_persistent_cache_min_entry_size_bytes": 0}
  saved = {k: getattr(jax.config, k) for k in options}
  for k, v in options.items():
    jax.config.update(k, v)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  metrics._CACHE = old


def make_config(steps, every=1, **rlhf_overrides):
  c = rlhf_tiny.get_config()
  c.train.steps = steps
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps)
  c.rlhf.update(**rlhf_overrides)
  c.logging.update(every=every, console=False, tensorboard=False)
  c.checkpoint.update(every=1000)
  return c


def records(workdir):
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    out[r["step"]] = r  # a resumed run logs its steps again: the last record wins
  return out


def test_demo_reward_rises_with_bounded_kl(tmp_path):
  """The README's command, shortened to 60 steps, in a subprocess on one CPU device (as a
  user runs it; 8 emulated devices would make each step several times slower here). Seeded:
  the mean reward goes 0.045 (steps 1-10) -> 0.162 (steps 51-60) with KL about 4."""
  steps = 60
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "XDG_CACHE_HOME": str(tmp_path / "cache")}
  subprocess.run([sys.executable, "-m", "trainers.rlhf", "--config", "configs/rlhf_tiny.py",
                  "--workdir", str(tmp_path), f"--config.train.steps={steps}",
                  "--config.logging.console=False", "--config.logging.tensorboard=False"],
                 cwd=REPO, env=env, check=True, timeout=600)
  m = records(tmp_path)
  first, last = m[10], m[steps]
  assert last["reward_mean"] > max(first["reward_mean"] + 0.08, 2 * first["reward_mean"]), \
      (first, last)
  assert 0 < last["kl"] < 15
  for key in ("reward_std", "completion_length", "truncated", "entropy",
              "rollout_tokens_per_s", "learner_tokens_per_s", "shaped_reward_mean"):
    assert np.isfinite(last[key]), key
  samples = [json.loads(line) for line in (tmp_path / rlhf.ROLLOUTS_FILE).read_text().splitlines()]
  assert {s["step"] for s in samples} == {1, 10, 20, 30, 40, 50, 60}
  assert plot.plot(tmp_path).is_file()


def stop_after(step):
  """rlhf.TASK that asks the loop to save and stop once `step` has run (as SIGTERM does)."""
  def stop(trainer, batch):
    if trainer.step_count + 1 == step:
      trainer.stop_requested.set()
    return batch
  return dataclasses.replace(rlhf.TASK, hooks=(hooks.before_step(stop), *rlhf.TASK.hooks))


def final_params(workdir, config, task=rlhf.TASK):
  trainer = loop.Trainer(config, workdir, task)
  with jax.set_mesh(trainer.mesh):
    trainer.init_state()
  params = jax.device_get(trainer.state.params)
  trainer.checkpoints.close()
  return params


def test_resume_continues_identically(tmp_path):
  config = make_config(4)
  straight, split = tmp_path / "straight", tmp_path / "split"
  loop.run(config, straight, rlhf.TASK)
  summary = loop.run(config, split, stop_after(2))
  assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 2
  loop.run(config, split, rlhf.TASK)
  a, b = records(straight), records(split)
  assert a[1]["kl"] == 0.0  # the first rollout's policy is the reference
  for step in (3, 4):
    for key in ("loss", "reward_mean", "kl", "entropy", "completion_length"):
      assert a[step][key] == b[step][key], (step, key)
  jax.tree.map(np.testing.assert_array_equal, final_params(straight, config),
               final_params(split, config))


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(ConfigError, match="exactly one of reward_fn"):
    loop.Trainer(make_config(2, reward_fn=""), tmp_path, rlhf.TASK)
  with pytest.raises(ConfigError, match="config.rlhf.reward_fn='nowhere:fn'"):
    loop.Trainer(make_config(2, reward_fn="nowhere:fn"), tmp_path, rlhf.TASK)
  with pytest.raises(ConfigError, match="config.rlhf.max_new_tokens=300"):
    loop.Trainer(make_config(2, max_new_tokens=300), tmp_path, rlhf.TASK)


def test_rollouts_compile_nothing_after_the_second_step(tmp_path):
  """Prompt lengths vary from batch to batch (here one prompt in eight is long), but the
  sampler's prefill width is pinned to the prompt buffer: steps 3-5 lower (and so compile)
  no program at all."""
  from jax._src import monitoring  # the public module has no unregister

  lowered = []
  def listen(event, duration, **_):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(duration)

  counts = []
  def count(trainer, batch):
    counts.append(len(lowered))
    return batch

  config = make_config(6)
  config.data.sources = ({"records": tuple(  # 16 tokens with the chat template, or 25
      {"prompt": f"What is {i} + 1?" if i % 8 == 3 else f"{i % 10}+1", "answer": str(i % 10 + 1)}
      for i in range(48))},)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    loop.run(config, tmp_path,
             dataclasses.replace(rlhf.TASK, hooks=(hooks.before_step(count), *rlhf.TASK.hooks)))
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert counts[0] < counts[1] <= counts[2] == counts[5], counts
