"""A reward model: the Gemma backbone with a scalar head read at the last real token.

`RewardModel` is a Transformer plus one parameter, `reward_head` [embed]: the reward of a
sequence is <final-normed features at its last token, reward_head>. Its parameter tree is the
Transformer's plus that entry, so a language model's directory starts it (config.init_from
fills the shared paths; the head starts fresh) and the LM machinery (sharding rules, the
train step, checkpoints) applies unchanged. No bias: the Bradley-Terry loss only sees
differences of rewards.

A reward trainer's workdir loads with gemma_jax.model_dir (load_reward_model).

Packed preference rows: a row may hold several pairs, as segments 1, 2, ... of the same ids in
its chosen_ and rejected_ halves; the reward of segment s is read at its last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.config import ModelConfig
from gemma_jax.model import Transformer
from gemma_jax.model.layers import make_param

PAIR_KEYS = tuple(f"{side}_{key}" for side in ("chosen", "rejected")
                  for key in ("tokens", "positions", "segment_ids"))


class RewardModel(Transformer):
  """Transformer + value head; `rewards(...)` gives the value at every position."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.reward_head = make_param(rngs, (cfg.embed_dim,), ("embed",),
                                  jnp.dtype(cfg.param_dtype), cfg.embed_dim ** -0.5)

  def values(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    """[B, T] float32: the head applied to every position's features."""
    features = self.features(tokens, positions, segment_ids)
    return jnp.einsum("btd,d->bt", features.astype(jnp.float32),
                      self.reward_head[...].astype(jnp.float32))


def init_reward_model(cfg: ModelConfig, seed: int | jax.Array = 0) -> RewardModel:
  return RewardModel(cfg, rngs=nnx.Rngs(params=seed))


def segment_rewards(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(rewards, present), both [B, T + 1] indexed by segment id: the value at the last token of
  each segment, and whether the row has that segment (index 0, padding, is never present)."""
  b, t = segment_ids.shape
  nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros((b, 1), segment_ids.dtype)], axis=1)
  last = (segment_ids > 0) & (nxt != segment_ids)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  ids = jnp.where(last, segment_ids, 0)
  rewards = jnp.zeros((b, t + 1), jnp.float32).at[rows, ids].add(jnp.where(last, values, 0.0))
  present = jnp.zeros((b, t + 1), jnp.int32).at[rows, ids].add(last.astype(jnp.int32)) > 0
  return rewards, present.at[:, 0].set(False)


def pair_rewards(model: RewardModel, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(r_chosen, r_rejected, pair mask), each [B, T + 1] by segment id, from one forward pass
  over the chosen and rejected rows stacked."""
  cat = lambda key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
  values = model.values(cat("tokens"), cat("positions"), cat("segment_ids"))
  b = batch["chosen_tokens"].shape[0]
  chosen, has_chosen = segment_rewards(values[:b], batch["chosen_segment_ids"])
  rejected, has_rejected = segment_rewards(values[b:], batch["rejected_segment_ids"])
  return chosen, rejected, has_chosen & has_rejected


def bradley_terry_loss(model: RewardModel, batch: dict, rng, *, margin: float = 0.0):
  """(sum over pairs of -log sigmoid(r_chosen - r_rejected - margin), pairs, extras).

  extras (sums over pairs; the train step divides by the pair count): accuracy (r_chosen >
  r_rejected), margin (r_chosen - r_rejected), reward_mean (of both rewards), reward_std (the
  standard deviation of this batch's rewards, times its pair count).
  """
  del rng
  chosen, rejected, pairs = pair_rewards(model, batch)
  w = pairs.astype(jnp.float32)
  n = jnp.sum(w)
  diff = chosen - rejected
  total = jnp.sum(w * -jax.nn.log_sigmoid(diff - margin))
  mean = jnp.sum(w * (chosen + rejected)) / jnp.maximum(2 * n, 1.0)
  var = jnp.sum(w * ((chosen - mean) ** 2 + (rejected - mean) ** 2)) / jnp.maximum(2 * n, 1.0)
  extras = {"accuracy": jnp.sum(w * (diff > 0)), "margin": jnp.sum(w * diff),
            "reward_mean": mean * n, "reward_std": jnp.sqrt(var) * n}
  return total, n, extras


def sequence_rewards(model: RewardModel, tokens, positions, segment_ids) -> jax.Array:
  """[B] the reward of each row holding one sequence (segment 1), at its last real token."""
  values = model.values(tokens, positions, segment_ids)
  rewards, _ = segment_rewards(values, segment_ids)
  return rewards[:, 1]
