"""Direct preference optimisation (DPO) and IPO on preference pairs.

With sequence log-probs (sums over the response tokens) of the policy and of the frozen
reference for the chosen and rejected responses of a pair:

  h     = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
  DPO   = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing,
                                                                       conservative DPO)
  IPO   = (h - 1 / (2 beta))^2                                        (Azar et al., on sums)

The implicit rewards are beta (log pi - log ref) of each response; a pair counts as correct
when the chosen one's is larger. Batches are the preference format of gemma_jax.data (pairs
as segments of chosen_ / rejected_ rows) plus the reference's token log-probs of both,
`chosen_ref_logprobs` / `rejected_ref_logprobs` [B, T] (trainers/dpo.py computes them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.logprob_loss import objective_loss

LOSSES = ("sigmoid", "ipo")
SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in
                  ("tokens", "positions", "segment_ids", "targets", "loss_weights",
                   "ref_logprobs"))


def pair_losses(h: jax.Array, *, beta: float, label_smoothing: float = 0.0,
                loss: str = "sigmoid") -> jax.Array:
  """The loss of each pair from its log-ratio difference h (see the module docstring)."""
  if loss == "sigmoid":
    return (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
            - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  if loss == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sums, present), both [B, T + 1] indexed by segment id: the sum of values over each
  segment of a row, and whether the row has it (index 0, padding, never is)."""
  b, t = segment_ids.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  sums = jnp.zeros((b, t + 1), jnp.float32).at[rows, segment_ids].add(values)
  present = jnp.zeros((b, t + 1), jnp.int32).at[rows, segment_ids].add(1) > 0
  return sums, present.at[:, 0].set(False)


def pair_statistics(logp, ref_logp, weights, segment_ids, *, beta: float, label_smoothing: float,
                    loss: str):
  """(loss sum, pairs, extras) from token arrays [2B, T] whose even rows are the chosen halves
  and odd rows the rejected ones (row 2i + 1 is row 2i's partner)."""
  policy, present = segment_sums(logp * weights, segment_ids)
  reference, _ = segment_sums(ref_logp * weights, segment_ids)
  ratio = policy - reference  # log pi - log ref of every response
  pairs = (present[0::2] & present[1::2]).astype(jnp.float32)
  h = ratio[0::2] - ratio[1::2]
  total = jnp.sum(pairs * pair_losses(h, beta=beta, label_smoothing=label_smoothing, loss=loss))
  chosen, rejected = beta * ratio[0::2], beta * ratio[1::2]
  extras = {"reward_accuracy": jnp.sum(pairs * (chosen > rejected)),
            "reward_margin": jnp.sum(pairs * (chosen - rejected)),
            "chosen_reward": jnp.sum(pairs * chosen), "rejected_reward": jnp.sum(pairs * rejected)}
  return total, (jnp.sum(pairs), extras)


def interleave(batch: dict, key: str) -> jax.Array:
  """chosen_key and rejected_key [B, ...] as [2B, ...] rows c0, r0, c1, r1, ...: a pair's two
  rows stay on the device that holds the pair."""
  c, r = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
  return jnp.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:])


def dpo_loss(model, batch: dict, rng, *, beta: float, label_smoothing: float = 0.0,
             loss: str = "sigmoid", chunk_size: int = 4096):
  """(sum over pairs of the pair loss, pairs, extras) for the train step: one forward pass
  over the chosen and rejected rows together. extras (sums over pairs): reward_accuracy,
  reward_margin, chosen_reward, rejected_reward."""
  rows = {k: interleave(batch, k) for k in ("tokens", "positions", "segment_ids", "targets")}
  weights, ref = interleave(batch, "loss_weights"), interleave(batch, "ref_logprobs")

  def objective(logp):
    return pair_statistics(logp, ref, weights, rows["segment_ids"], beta=beta,
                           label_smoothing=label_smoothing, loss=loss)

  return objective_loss(model, rows, rng, objective, chunk_size=chunk_size)
