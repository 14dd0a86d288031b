"""Losses that are any function of the targets' token log-probs (DPO, GRPO), differentiated
through the memory-efficient cross-entropy.

`losses.token_cross_entropy` computes only weighted sums of -log p(target), with the
vocabulary in tiles and shards and no [tokens, vocab] residuals. DPO's log-sigmoid of
sequence sums or GRPO's clipped ratio are not such sums, but their gradients are:
d f = sum_t (df / d log p_t) d log p_t. So `objective_loss` reads the values of log p from a
scoring pass (`losses.token_logprobs`, no gradient), takes c = df / d log p at them, and adds
CE(weights = -c) - stop_gradient(CE) to f: zero in value, exactly f's gradient. The price is
one more forward pass over the vocabulary (no backward).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from gemma_jax.losses import token_cross_entropy, token_logprobs

# objective(logp [B, T]) -> (sum, (weight, extras)): the loss of the targets' log-probs.
Objective = Callable[[jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]


def objective_loss(model, batch: dict, rng, objective: Objective, *, chunk_size: int = 4096):
  """(sum, weight, extras) of objective(log p(targets)) for the train step, whose gradient
  w.r.t. the model is objective's (see the module docstring). batch: tokens, positions,
  segment_ids, targets [B, T]; rng: LoRA dropout."""
  features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
  table = model.embedder.input_embedding[...]
  kw = {"final_softcap": model.config.final_logits_softcap, "chunk_size": chunk_size}
  logp, _ = token_logprobs(jax.lax.stop_gradient(features), jax.lax.stop_gradient(table),
                           batch["targets"], **kw)
  (total, (weight, extras)), coef = jax.value_and_grad(objective, has_aux=True)(logp)
  carrier, _ = token_cross_entropy(features, table, batch["targets"],
                                   -jax.lax.stop_gradient(coef), **kw)
  return jax.lax.stop_gradient(total) + (carrier - jax.lax.stop_gradient(carrier)), weight, extras
