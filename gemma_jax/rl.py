"""REINFORCE with a leave-one-out baseline (RLOO) and a KL penalty towards a reference policy.

A step samples k completions for each of P prompts; arrays over completions are [N = P * k]
in prompt-major order (completion j of prompt p is row p * k + j). With per-token log-probs
of the policy and the frozen reference under teacher forcing:

  kl_i  = sum_t (log pi(y_i,t) - log pi_ref(y_i,t))           (the sampled-token estimate)
  R_i   = r_i - beta * kl_i                                     (no gradient flows through R)
  A_i   = R_i - mean_{j != i} R_j  over the k completions of the same prompt
  loss  = -mean_i A_i * sum_t log pi(y_i,t)

optionally with rewards clipped, truncated completions re-scored, and advantages whitened.
Everything here is plain jnp on small arrays; the model-facing pieces (`completion_logprobs`,
`policy_loss`) take the final features and the tied embedding table like gemma_jax.losses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma_jax import grpo
from gemma_jax.losses import token_cross_entropy, token_logprobs

TRUNCATED_MODES = ("keep", "zero", "penalty")
ALGORITHMS = ("rloo", "grpo")  # config.rlhf.algorithm: the advantage estimator and the loss


def sequence_kl(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """[N] sum over completion tokens of log pi - log pi_ref (mask [N, T] marks them)."""
  return jnp.sum((logprobs - ref_logprobs) * mask, axis=-1)


def shape_rewards(scores: jax.Array, kl: jax.Array, truncated: jax.Array, *, beta: float,
                  clip: float = 0.0, truncated_mode: str = "keep",
                  truncated_penalty: float = 0.0) -> jax.Array:
  """Sequence rewards R = r - beta * kl [N].

  clip > 0 clips the scores r to [-clip, clip] first. A truncated completion (it hit
  max_new_tokens without a stop token) keeps its score ("keep"), scores 0 ("zero"), or has
  truncated_penalty subtracted ("penalty"); the KL term applies to every completion.
  """
  if truncated_mode not in TRUNCATED_MODES:
    raise ValueError(f"truncated_mode must be one of {TRUNCATED_MODES}, got {truncated_mode!r}")
  r = jnp.asarray(scores, jnp.float32)
  if clip > 0:
    r = jnp.clip(r, -clip, clip)
  if truncated_mode == "zero":
    r = jnp.where(truncated, 0.0, r)
  elif truncated_mode == "penalty":
    r = jnp.where(truncated, r - truncated_penalty, r)
  return jax.lax.stop_gradient(r - beta * kl)


def rloo_advantages(rewards: jax.Array, k: int) -> jax.Array:
  """A_i = R_i - (sum of the other k - 1 rewards of its prompt) / (k - 1), [N]."""
  if k < 2:
    raise ValueError(f"RLOO needs k >= 2 completions per prompt, got k={k}")
  groups = jnp.asarray(rewards, jnp.float32).reshape(-1, k)
  others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (k - 1)
  return (groups - others).reshape(-1)


def whiten(advantages: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Advantages scaled to mean 0 and standard deviation 1 over the batch."""
  a = jnp.asarray(advantages, jnp.float32)
  return (a - jnp.mean(a)) / (jnp.std(a) + eps)


def policy_loss(logprob_sums: jax.Array, advantages: jax.Array) -> jax.Array:
  """-mean_i A_i * sum_t log pi(y_i,t): the REINFORCE surrogate (advantages are constants)."""
  return -jnp.mean(jax.lax.stop_gradient(advantages) * logprob_sums)


# ----------------------------------------------------------------------------- model side


def completion_logprobs(features: jax.Array, table: jax.Array, targets: jax.Array, *,
                        final_softcap: float | None = None, chunk_size: int = 4096
                        ) -> tuple[jax.Array, jax.Array]:
  """(log p(targets), entropy) per position [B, T] of the tied logits features @ table.T at
  temperature 1, in float32, over token chunks (gemma_jax.losses.token_logprobs: on the context
  mesh each chip scores its own rows). For scoring only (no gradient is meant to flow)."""
  return token_logprobs(features, table, targets, final_softcap=final_softcap,
                        chunk_size=chunk_size)


def rloo_loss(model, batch: dict, rng, *, chunk_size: int = 4096):
  """The policy-gradient loss for the train step as (sum, weight).

  batch: tokens/positions/segment_ids/targets [N, T] of prompt + completion rows, and
  loss_weights [N, T] = the row's advantage A_i on each completion target (0 elsewhere), so
  sum_t w * (-log p) = -A_i sum_t log pi(y_i,t). weight = the number of (non-padding) rows,
  so the step's loss is -mean_i A_i sum_t log pi(y_i,t). The mesh is the context's
  (`jax.set_mesh`).
  """
  # rng: LoRA dropout (a plain model ignores it).
  features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
  total, _ = token_cross_entropy(features, model.embedder.input_embedding[...],
                                 batch["targets"], batch["loss_weights"],
                                 final_softcap=model.config.final_logits_softcap,
                                 chunk_size=chunk_size)
  rows = jnp.sum(jnp.any(batch["segment_ids"] > 0, axis=-1)).astype(jnp.float32)
  return total, rows


@functools.partial(jax.jit, static_argnames=("k", "beta", "clip", "truncated_mode",
                                             "truncated_penalty", "whiten_advantages",
                                             "algorithm"))
def advantages_from(scores, logprobs, ref_logprobs, mask, truncated, *, k: int, beta: float,
                    clip: float, truncated_mode: str, truncated_penalty: float,
                    whiten_advantages: bool, algorithm: str = "rloo") -> dict[str, jax.Array]:
  """Everything a step needs from the scores and token log-probs: kl, R and A, all [N].
  algorithm "rloo": leave-one-out advantages; "grpo": group-normalised ones
  (gemma_jax/grpo.py). beta 0 leaves the KL out of R (GRPO with the KL as a loss term)."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  kl = sequence_kl(logprobs, ref_logprobs, mask)
  rewards = shape_rewards(scores, kl, truncated, beta=beta, clip=clip,
                          truncated_mode=truncated_mode, truncated_penalty=truncated_penalty)
  advantages = (rloo_advantages(rewards, k) if algorithm == "rloo"
                else grpo.group_advantages(rewards, k))
  if whiten_advantages:
    advantages = whiten(advantages)
  return {"kl": kl, "rewards": rewards, "advantages": advantages}
