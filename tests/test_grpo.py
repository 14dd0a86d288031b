"""GRPO (gemma_jax/grpo.py, rlhf.algorithm="grpo"): advantages, clipped ratios, k3 and both
normalisations against float64 NumPy loops; the model-side loss against full logits; one
update without clipping is REINFORCE; the arithmetic demo's reward rises; a stop asked for
inside a rollout cycle takes effect at its end and the resumed run is bit-exact."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_multihost import metrics as records
from test_rl import CFG, reference_token_logprobs, rollout_rows
from test_rlhf import caches, final_params  # noqa: F401  (caches: a fixture)

from configs import grpo_tiny
from configs.base import ConfigError
from gemma_jax import grpo, rl
from gemma_jax.model import init_model
from trainers import hooks, loop, rlhf

REPO = Path(__file__).resolve().parent.parent
P, K, T = 3, 4, 6


def test_group_advantages_match_numpy():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=P * K) * 3
  rewards[K:2 * K] = 1.5  # a group of equal rewards: advantages exactly 0
  want = np.zeros(P * K)
  for i in range(P * K):
    group = rewards[i // K * K:i // K * K + K]
    mean = sum(group) / K
    std = math.sqrt(sum((g - mean) ** 2 for g in group) / (K - 1))
    want[i] = (rewards[i] - mean) / (std + grpo.GROUP_EPS)
  got = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.float32), K))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[K:2 * K] == 0)
  with pytest.raises(ValueError, match="k >= 2"):
    grpo.group_advantages(jnp.zeros(4), 1)


def numpy_token_losses(logp, old, adv, ref, mask, *, clip, beta, mode):
  """(loss, clip fraction, kl) by loops in float64, normalised like the loss."""
  n, T = logp.shape
  per = np.zeros((n, T))
  clipped = np.zeros((n, T))
  k3 = np.zeros((n, T))
  for i in range(n):
    for t in range(T):
      ratio = math.exp(logp[i, t] - old[i, t])
      surrogate = ratio * adv[i]
      if clip is not None:
        bounded = min(max(ratio, 1 - clip), 1 + clip) * adv[i]
        clipped[i, t] = bounded < surrogate
        surrogate = min(surrogate, bounded)
      d = ref[i, t] - logp[i, t]
      k3[i, t] = math.exp(d) - d - 1
      per[i, t] = -surrogate + beta * k3[i, t]

  def norm(v):
    if mode == "token":
      return sum(v[i, t] * mask[i, t] for i in range(n) for t in range(T)) / mask.sum()
    rows = [i for i in range(n) if mask[i].sum() > 0]
    return sum(sum(v[i, t] * mask[i, t] for t in range(T)) / mask[i].sum()
               for i in rows) / len(rows)

  return norm(per), norm(clipped), norm(k3)


def random_rollout(seed=1):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 3.0, (P * K, T))
  old = logp + rng.normal(scale=0.3, size=logp.shape)  # ratios around 1, some clipped
  ref = logp + rng.normal(scale=0.5, size=logp.shape)
  mask = (np.arange(T)[None] < rng.integers(1, T + 1, P * K)[:, None]).astype(np.float64)
  mask[2] = 0  # a completion with no tokens: not counted by the sequence mean
  return logp, old, rng.normal(size=P * K), ref, mask


@pytest.mark.parametrize("clip,beta,mode", [(0.2, 0.1, "token"), (None, 0.0, "sequence"),
                                            (0.1, 0.05, "sequence"), (None, 0.3, "token")])
def test_token_losses_and_normalisation_match_numpy(clip, beta, mode):
  logp, old, adv, ref, mask = random_rollout()
  want = numpy_token_losses(logp, old, adv, ref, mask, clip=clip, beta=beta, mode=mode)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  losses, metrics = grpo.token_losses(f32(logp), f32(old), f32(adv[:, None] * mask), f32(ref),
                                      clip_eps=clip, beta=beta)
  got = [grpo.normalise(v, f32(mask), mode) for v in (losses, metrics["clip_fraction"],
                                                      metrics["kl_k3"])]
  for (total, weight), w in zip(got, want):
    np.testing.assert_allclose(total / weight, w, rtol=1e-5, atol=1e-6)
  if clip is not None:
    assert 0 < want[1] < 0.5  # clipping happens, on some tokens


def model_batch(model, seed, clip=0.2, noise=0.3):
  """Learner rows (tiny model) whose behaviour log-probs are the model's own plus noise."""
  _, _, rows = rollout_rows(seed=seed)
  logp, _ = reference_token_logprobs(model, rows)
  rng = np.random.default_rng(seed + 1)
  batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids", "targets")}
  batch["loss_weights"] = jnp.asarray(rows["advantages"][:, None] * rows["mask"])
  batch["completion_mask"] = jnp.asarray(rows["mask"])
  old = logp + noise * rng.normal(size=logp.shape)
  ref = logp + 0.5 * rng.normal(size=logp.shape)
  batch["old_logprobs"], batch["ref_logprobs"] = (jnp.asarray(x, jnp.float32) for x in (old, ref))
  return rows, logp, batch


def test_grpo_loss_on_the_model_matches_numpy():
  model = init_model(CFG, seed=3)
  rows, logp, batch = model_batch(model, seed=4)
  for mode in grpo.NORMALISATIONS:
    total, weight, extras = grpo.grpo_loss(model, batch, None, clip_eps=0.2, beta=0.1,
                                           normalisation=mode, chunk_size=24)
    want = numpy_token_losses(logp, np.asarray(batch["old_logprobs"], np.float64),
                              rows["advantages"], np.asarray(batch["ref_logprobs"], np.float64),
                              rows["mask"], clip=0.2, beta=0.1, mode=mode)
    np.testing.assert_allclose(total / weight, want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(extras["clip_fraction"] / weight, want[1], atol=1e-6)
    np.testing.assert_allclose(extras["kl_k3"] / weight, want[2], rtol=1e-4)


@pytest.mark.parametrize("mode,clip", [("token", None), ("sequence", 0.2)])
def test_one_update_without_clipping_is_reinforce(mode, clip):
  """Behaviour log-probs = the current policy's (one update per rollout), no KL term: the
  GRPO gradient equals REINFORCE's (rl.rloo_loss) with the same advantages and the same
  normalisation (with a ratio of 1, clip_eps 0.2 clips nothing either)."""
  model = init_model(CFG, seed=5)
  rows, _, batch = model_batch(model, seed=6)
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  logp, _, _ = rlhf._teacher_forced(graphdef, params, params, *(batch[k] for k in (
      "tokens", "positions", "segment_ids", "targets")), chunk_size=24)
  batch["old_logprobs"] = logp
  mask = rows["mask"]
  lengths = np.maximum(mask.sum(1, keepdims=True), 1)
  scale = mask / lengths if mode == "sequence" else mask
  reinforce = {**batch, "loss_weights": jnp.asarray(rows["advantages"][:, None] * scale)}

  def sums(p, fn, b):
    return fn(nnx.merge(graphdef, nnx.State(p)), b, None, chunk_size=24)[0]

  grpo_fn = lambda m, b, r, chunk_size: grpo.grpo_loss(m, b, r, clip_eps=clip, beta=0.0,
                                                       normalisation=mode, chunk_size=chunk_size)
  got = jax.jit(jax.grad(sums, argnums=0), static_argnums=1)(params, grpo_fn, batch)
  want = jax.jit(jax.grad(sums, argnums=0), static_argnums=1)(params, rl.rloo_loss, reinforce)
  leaves = jax.tree.leaves(want)
  assert max(float(jnp.max(jnp.abs(w))) for w in leaves) > 1e-2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


@pytest.mark.slow  # 60 steps of the demo, ~30 s
def test_demo_reward_rises(tmp_path):
  """configs/grpo_tiny.py shortened to 60 steps (15 rollouts), one CPU device. Seeded: the
  mean reward goes 0.05 (steps 1-10) -> 0.49 (steps 51-60)."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "XDG_CACHE_HOME": str(tmp_path / "cache")}
  subprocess.run([sys.executable, "-m", "trainers.rlhf", "--config", "configs/grpo_tiny.py",
                  "--workdir", str(tmp_path), "--config.train.steps=60",
                  "--config.logging.console=False", "--config.logging.tensorboard=False"],
                 cwd=REPO, env=env, check=True, timeout=600)
  m = records(tmp_path)
  assert m[60]["reward_mean"] > max(m[10]["reward_mean"] + 0.2, 3 * m[10]["reward_mean"]), m
  assert 0 < m[60]["clip_fraction"] < 0.5 and np.isfinite(m[60]["kl_k3"])


def make_config(steps, **rlhf_overrides):
  c = grpo_tiny.get_config()
  c.train.steps, c.optimizer.warmup_steps = steps, 1
  c.rlhf.update(**{"updates_per_rollout": 1, "minibatches": 2, **rlhf_overrides})
  c.logging.update(every=1, console=False, tensorboard=False)
  c.checkpoint.update(every=2)
  return c


def stop_at(step):
  def stop(trainer, batch):
    if trainer.step_count + 1 == step:
      trainer.stop_requested.set()
    return batch
  return dataclasses.replace(rlhf.TASK, hooks=(hooks.before_step(stop), *rlhf.TASK.hooks))


@pytest.mark.slow  # ~50 s of cycles, a stop and a resume
def test_stop_inside_a_cycle_waits_for_its_end_and_resumes_exactly(tmp_path):
  """8 devices, cycles of 2 steps (2 minibatches): a stop asked for at step 1 saves at step
  2; the resumed run's rollout at step 3 and the updates equal a straight run's."""
  config = make_config(4)
  straight, split = tmp_path / "straight", tmp_path / "split"
  loop.run(config, straight, rlhf.TASK)
  summary = loop.run(config, split, stop_at(1))
  assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 2
  loop.run(config, split, rlhf.TASK)
  a, b = records(straight), records(split)
  assert "reward_mean" in a[3] and "reward_mean" not in a[4]  # a rollout every 2 steps
  assert a[1]["ratio"] == pytest.approx(1.0, abs=1e-5)  # the behaviour policy is the policy
  for step in (3, 4):
    for key in ("loss", "grad_norm", "ratio", "clip_fraction", "kl_k3"):
      assert a[step][key] == b[step][key], (step, key)
  for key in ("reward_mean", "kl", "completion_length"):
    assert a[3][key] == b[3][key], key
  jax.tree.map(np.testing.assert_array_equal, final_params(straight, config),
               final_params(split, config))


@pytest.mark.parametrize("overrides,message", [
    ({"algorithm": "ppo"}, "config.rlhf.algorithm='ppo'"),
    ({"algorithm": "rloo", "kl": "reward"}, "algorithm='rloo' takes one update per rollout"),
    ({"minibatches": 3}, "config.rlhf.minibatches=3"),
    ({"updates_per_rollout": 3}, "config.train.steps=4 must be a multiple of the 6 steps"),
    ({"normalisation": "batch"}, "config.rlhf.normalisation='batch'")])
def test_config_errors_name_the_key(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    loop.Trainer(make_config(4, **overrides), tmp_path, rlhf.TASK)
