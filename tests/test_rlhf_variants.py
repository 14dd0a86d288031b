"""RLHF variants on configs/rlhf_tiny.py (8 emulated CPU devices): rollouts scored by a
reward-model workdir, and LoRA, whose reference is the frozen base (KL exactly 0 on the first
rollout, not after an update of the adapters)."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import reward_tiny
from gemma_jax.model_dir import load_reward_model
from trainers import loop, reward, rlhf
from test_rlhf import caches, make_config, records  # noqa: F401  (caches: a fixture)


def test_reward_model_scores_rollouts(tmp_path, monkeypatch):
  """The scores of the rollouts are the reward model's value at each row's last real token
  (recomputed here from the saved workdir, outside the trainer)."""
  rc = reward_tiny.get_config()
  rc.train.steps, rc.optimizer.warmup_steps = 2, 0
  rc.eval.every = 0
  rc.logging.update(console=False, tensorboard=False)
  loop.run(rc, tmp_path / "reward", reward.TASK)
  seen = []
  scores_of = rlhf.Rollouts._scores

  def spy(self, prompts, completions, fields, rows):
    scores = scores_of(self, prompts, completions, fields, rows)
    seen.append((np.asarray(scores), *jax.device_get((rows["tokens"], rows["segment_ids"]))))
    return scores

  monkeypatch.setattr(rlhf.Rollouts, "_scores", spy)
  config = make_config(2, reward_fn="", reward_model=str(tmp_path / "reward"))
  loop.run(config, tmp_path / "policy", rlhf.TASK)
  m = records(tmp_path / "policy")[2]
  assert np.isfinite(m["reward_mean"]) and m["reward_std"] > 0
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh):
    _, model, _ = load_reward_model(tmp_path / "reward", mesh)
    for scores, tokens, segment_ids in seen:
      values = np.asarray(model.values(jnp.asarray(tokens), None, jnp.asarray(segment_ids)))
      last = segment_ids.sum(axis=1) - 1
      np.testing.assert_allclose(scores, values[np.arange(len(last)), last], atol=1e-4)


def test_lora_reference_is_the_frozen_base(tmp_path):
  config = make_config(2)
  config.lora.rank = 4
  config.optimizer.warmup_steps = 0  # step 1 must change the adapters
  loop.run(config, tmp_path, rlhf.TASK)
  m = records(tmp_path)
  assert m[1]["kl"] == 0.0 and m[2]["kl"] != 0.0
