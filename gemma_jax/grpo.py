"""GRPO: group-normalised advantages and a PPO-style clipped objective against the behaviour
policy, with the KL to the reference as a loss term (k3) or folded into the reward.

Arrays over completions are [N = P * k], prompt-major like gemma_jax/rl.py. Per token t of
completion i, with the current policy pi, the behaviour policy pi_old (the one that sampled)
and the reference:

  A_i     = (R_i - mean_g R) / (std_g R + eps)        over the k completions of i's prompt
                                                      (std with ddof=1, as TRL and Tunix)
  rho_it  = exp(log pi(y_it) - log pi_old(y_it))
  l_it    = -min(rho_it A_i, clip(rho_it, 1 - e, 1 + e) A_i) + beta k3_it
  k3_it   = exp(log ref - log pi) - (log ref - log pi) - 1    (>= 0; only with kl="loss")

and the loss is the token mean (sum_it l_it / sum_i |y_i|) or the sequence mean
(mean_i sum_t l_it / |y_i|), both as (sum, weight) so minibatches accumulate exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.logprob_loss import objective_loss

NORMALISATIONS = ("token", "sequence")
KL_MODES = ("loss", "reward")
GROUP_EPS = 1e-4
# Extra learner-batch keys: which targets are completion tokens, the behaviour and the
# reference policies' log-probs of them [N, T].
BUFFER_KEYS = ("completion_mask", "old_logprobs", "ref_logprobs")


def group_advantages(rewards: jax.Array, k: int, eps: float = GROUP_EPS) -> jax.Array:
  """(R - mean) / (std + eps) over each prompt's k completions, [N]."""
  if k < 2:
    raise ValueError(f"GRPO needs k >= 2 completions per prompt, got k={k}")
  groups = jnp.asarray(rewards, jnp.float32).reshape(-1, k)
  mean = jnp.mean(groups, axis=1, keepdims=True)
  std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
  return ((groups - mean) / (std + eps)).reshape(-1)


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """The k3 estimator of KL(pi || ref) per token: unbiased, non-negative, low variance."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1


def token_losses(logp, old_logp, advantages, ref_logp, *, clip_eps: float | None,
                 beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(l_it, per-token metrics) [N, T]; advantages per token (A_i on i's row); clip_eps None
  = no clipping; beta weighs the k3 term (0: the KL is not in the loss)."""
  ratio = jnp.exp(logp - old_logp)
  surrogate = ratio * advantages
  clipped = jnp.zeros_like(ratio, bool)
  if clip_eps is not None:
    bounded = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    clipped = bounded < surrogate
    surrogate = jnp.minimum(surrogate, bounded)
  k3 = kl_k3(logp, ref_logp)
  losses = -surrogate + beta * k3 if beta else -surrogate
  return losses, {"clip_fraction": clipped.astype(jnp.float32), "ratio": ratio, "kl_k3": k3}


def normalise(values: jax.Array, mask: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """(sum, weight) of per-token values [N, T] over mask: the token mean or sequence mean."""
  if mode == "token":
    return jnp.sum(values * mask), jnp.sum(mask)
  if mode == "sequence":
    lengths = jnp.sum(mask, axis=-1)
    per_row = jnp.sum(values * mask, axis=-1) / jnp.maximum(lengths, 1.0)
    return jnp.sum(per_row), jnp.sum(lengths > 0).astype(jnp.float32)
  raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {mode!r}")


def grpo_loss(model, batch: dict, rng, *, clip_eps: float | None, beta: float,
              normalisation: str = "token", chunk_size: int = 4096):
  """The clipped GRPO objective for the train step as (sum, weight, extras).

  batch: tokens/positions/segment_ids/targets [N, T] of prompt + completion rows;
  loss_weights = A_i on row i's completion targets (0 elsewhere), and BUFFER_KEYS. beta > 0
  adds the k3 KL term (config.rlhf.kl = "loss"). extras, normalised like the loss:
  clip_fraction, ratio, kl_k3."""
  mask, advantages = batch["completion_mask"], batch["loss_weights"]

  on = mask > 0  # elsewhere (prompt, padding) the log-probs are of no completion: zero them,
  # so that no exp overflows there (inf * 0 would be NaN)
  old, ref = (jnp.where(on, batch[k], 0.0) for k in ("old_logprobs", "ref_logprobs"))

  def objective(logp):
    losses, metrics = token_losses(jnp.where(on, logp, 0.0), old, advantages, ref,
                                   clip_eps=clip_eps, beta=beta)
    total, weight = normalise(losses, mask, normalisation)
    extras = {k: normalise(v, mask, normalisation)[0] for k, v in metrics.items()}
    return total, (weight, extras)

  return objective_loss(model, batch, rng, objective, chunk_size=chunk_size)
