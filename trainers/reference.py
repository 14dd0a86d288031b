"""The frozen reference policy of RLHF and DPO runs, and teacher-forced token log-probs.

The reference is the policy the run started from: the run's initial trainable params
(config.init_from, else the seeded random init) on the current state's frozen part. With
LoRA that is the initial adapters (B = 0: they add exactly nothing) on the shared frozen
base, so no second copy of the model exists; without LoRA it is one copy of the initial
weights. It is rebuilt the same way on resume, so a resumed run has the same reference.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
from flax import nnx

from gemma_jax import rl

if TYPE_CHECKING:
  from trainers.loop import Trainer


class Reference:
  """The reference's parameters, made at first use (the trainer's state must exist)."""

  def __init__(self):
    self._initial: dict | None = None

  def params(self, trainer: Trainer) -> dict:
    """The reference's whole parameter dict, on the current state's frozen part (the train
    step donates the state, so an old reference to a LoRA base would be dead)."""
    if self._initial is None:
      self._initial = trainer.layout.initial("params", trainer.config.train.seed,
                                             trainer.base_params())
    return trainer.state.replace(params=self._initial).model_params()


def jit_token_logprobs(graphdef, chunk_size: int):
  """logprobs(params, tokens, positions, segment_ids, targets) -> log p(targets) [B, T] at
  temperature 1, jitted, with no gradient."""
  return jax.jit(functools.partial(_token_logprobs, graphdef, chunk_size=chunk_size))


def _token_logprobs(graphdef, params, tokens, positions, segment_ids, targets, *,
                    chunk_size: int):
  model = nnx.merge(graphdef, nnx.State(params))
  model.eval()  # the reference has no dropout
  features = model.features(tokens, positions, segment_ids)
  logp, _ = rl.completion_logprobs(features, model.embedder.input_embedding[...], targets,
                                   final_softcap=model.config.final_logits_softcap,
                                   chunk_size=chunk_size)
  return logp
