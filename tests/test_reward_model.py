"""The reward model: rewards at the last real token of packed segments, the Bradley-Terry loss
against float64 NumPy, init_from a language model, and the reward trainer end to end on the
synthetic digits-vs-words task (configs/reward_tiny.py): held-out accuracy above 0.9."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import reward_tiny
from configs.base import model_config
from gemma_jax import checkpoint, metrics
from gemma_jax.config import get_config
from gemma_jax.model import init_model
from gemma_jax.model_dir import load_reward_model
from gemma_jax.reward_model import (bradley_terry_loss, init_reward_model, segment_rewards,
                                    sequence_rewards)
from gemma_jax.tokenizer import Tokenizer
from trainers import loop, reward

CFG = get_config("tiny_gemma3", dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def peak_cache(tmp_path_factory):
  """Keep the measured CPU peak out of ~/.cache."""
  directory = tmp_path_factory.mktemp("peak")
  old = metrics._CACHE
  metrics._CACHE = directory / "gemma_jax"
  yield
  metrics._CACHE = old


def packed_pairs(seed=0):
  """Two rows; row 0 holds pairs 1 and 2, row 1 one pair then padding. Chosen and rejected
  halves have the same segments with different lengths."""
  rng = np.random.default_rng(seed)
  batch = {}
  layouts = {"chosen": [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]],
             "rejected": [[1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]}
  for side, seg in layouts.items():
    seg = np.array(seg, np.int32)
    pos = np.zeros_like(seg)
    for r in range(2):
      for s in set(seg[r]) - {0}:
        pos[r, seg[r] == s] = np.arange((seg[r] == s).sum())
    batch[f"{side}_segment_ids"] = seg
    batch[f"{side}_positions"] = pos
    batch[f"{side}_tokens"] = np.where(seg > 0, rng.integers(4, CFG.vocab_size, seg.shape), 0)
  return batch


def numpy_segment_rewards(values, segment_ids):
  """{(row, segment): value at the segment's last token}, by loops."""
  out = {}
  for r in range(values.shape[0]):
    for t in range(values.shape[1]):
      s = segment_ids[r, t]
      if s and (t + 1 == values.shape[1] or segment_ids[r, t + 1] != s):
        out[r, s] = float(values[r, t])
  return out


def test_segment_rewards_read_the_last_token_of_each_segment():
  seg = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
  values = np.random.default_rng(1).normal(size=seg.shape).astype(np.float32)
  rewards, present = segment_rewards(jnp.asarray(values), jnp.asarray(seg))
  want = numpy_segment_rewards(values, seg)
  assert {(r, s) for r, s in zip(*np.nonzero(np.asarray(present)))} == set(want)
  for (r, s), v in want.items():
    assert float(rewards[r, s]) == pytest.approx(v, abs=1e-6)


def test_bradley_terry_loss_and_metrics_match_numpy():
  model = init_reward_model(CFG, seed=3)
  graphdef, state = nnx.split(model)
  batch = packed_pairs()
  margin = 0.3
  total, n, extras = jax.jit(lambda s, b: bradley_terry_loss(
      nnx.merge(graphdef, s), b, None, margin=margin))(state, batch)
  features_of = jax.jit(lambda s, *args: nnx.merge(graphdef, s).features(*args))
  r = {}
  for side in ("chosen", "rejected"):
    features = np.asarray(features_of(state, batch[f"{side}_tokens"],
                                      batch[f"{side}_positions"],
                                      batch[f"{side}_segment_ids"]), np.float64)
    values = features @ np.asarray(model.reward_head[...], np.float64)
    r[side] = numpy_segment_rewards(values, batch[f"{side}_segment_ids"])
  pairs = sorted(r["chosen"])
  assert pairs == [(0, 1), (0, 2), (1, 1)]
  diff = np.array([r["chosen"][p] - r["rejected"][p] for p in pairs])
  both = np.array([r[s][p] for s in ("chosen", "rejected") for p in pairs])
  assert float(n) == 3
  np.testing.assert_allclose(total, np.sum(np.log1p(np.exp(-(diff - margin)))), rtol=1e-5)
  np.testing.assert_allclose(extras["accuracy"], np.sum(diff > 0), atol=1e-6)
  np.testing.assert_allclose(extras["margin"], diff.sum(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(extras["reward_mean"] / n, both.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(extras["reward_std"] / n, both.std(), rtol=1e-4)


def config_for(tmp_path, **train):
  c = reward_tiny.get_config()
  c.train.update(**train)
  c.logging.update(console=False, tensorboard=False)
  return c


def test_init_from_a_language_model_fills_the_backbone(tmp_path):
  """The Transformer's params come from the directory; the head keeps its fresh init."""
  c = config_for(tmp_path, steps=1)
  c.optimizer.warmup_steps = 0
  lm = init_model(model_config(c), seed=11)
  c.init_from = str(checkpoint.save_model_dir(tmp_path / "lm", model_config(c), lm))
  trainer = loop.Trainer(c, tmp_path / "w", reward.TASK)
  with jax.set_mesh(trainer.mesh):
    trainer.init_state()
  params = jax.device_get(trainer.state.params)
  want = nnx.state(lm, nnx.Param).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in want}, want)
  fresh = nnx.state(init_reward_model(model_config(c), c.train.seed), nnx.Param).to_pure_dict()
  np.testing.assert_array_equal(params["reward_head"], fresh["reward_head"])
  trainer.checkpoints.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reward") / "w"
  summary = loop.run(config_for(workdir), workdir, reward.TASK)
  return workdir, summary


def test_reward_model_learns_the_synthetic_preference_task(trained):
  workdir, summary = trained
  assert summary["eval_accuracy"] > 0.9, summary
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  first = next(r for r in records if "accuracy" in r)
  assert first["accuracy"] < summary["accuracy"]
  for key in ("accuracy", "margin", "reward_mean", "reward_std", "eval_accuracy",
              "eval_margin"):
    assert key in summary


def test_saved_reward_model_scores_held_out_pairs(trained):
  """Loaded from the workdir (as RLHF does), it prefers digits on >= 90% of held-out pairs."""
  workdir, _ = trained
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh):
    _, model, tok_path = load_reward_model(workdir, mesh)
  tok = Tokenizer(tok_path)
  pairs = [json.loads(line) for line in
           open(os.path.join(reward_tiny.DATA, "reward_pairs_heldout.jsonl"))][:32]
  rows = []
  for p in pairs:
    prompt = tok.encode_chat([{"role": "user", "content": p["prompt"]}])
    for side in ("chosen", "rejected"):
      rows.append(prompt + tok.encode(p[side]) + [tok.end_of_turn_id])
  width = max(map(len, rows))
  tokens = np.zeros((len(rows), width), np.int32)
  seg = np.zeros_like(tokens)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], seg[i, :len(row)] = row, 1
  positions = np.broadcast_to(np.arange(width), tokens.shape) * seg
  scores = np.asarray(sequence_rewards(model, jnp.asarray(tokens), jnp.asarray(positions),
                                       jnp.asarray(seg)))
  assert np.mean(scores[0::2] > scores[1::2]) >= 0.9
