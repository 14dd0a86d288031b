"""DPO / IPO on preference pairs: the policy learns from chosen vs rejected responses directly,
with no reward model and no sampling.

  python -m trainers.dpo --config configs/dpo_tiny.py --workdir /tmp/dpo_tiny       # CPU demo
  python -m trainers.dpo --config configs/dpo_gemma3_270m.py --workdir DIR          # real 270M
  python -m trainers.dpo --config configs/dpo_gemma_2b.py --workdir DIR --distributed  # pod

Each step (and each evaluation batch) the reference hook adds the frozen reference's token
log-probs of the chosen and rejected rows (trainers/reference.py: the starting policy; with
LoRA the base with its initial zero-effect adapters, no second copy), on the same mesh; the
train step then minimises gemma_jax.dpo's loss (config.dpo: beta, label_smoothing, loss
"sigmoid" | "ipo"). Metrics: loss, reward_accuracy, reward_margin, chosen_reward and
rejected_reward (beta * (log pi - log ref) of each response, per pair), and eval_* of the
same on config.eval.sources (held-out pairs). See trainers/loop.py.
"""

from __future__ import annotations

import functools
import sys

import ml_collections

from configs.base import ConfigError
from gemma_jax import dpo
from gemma_jax.train_step import LossFn
from trainers import cli, hooks, loop
from trainers.reference import Reference, jit_token_logprobs


def make_loss(config: ml_collections.ConfigDict) -> LossFn:
  check_config(config)
  d = config.dpo
  return functools.partial(dpo.dpo_loss, beta=float(d.beta),
                           label_smoothing=float(d.label_smoothing), loss=d.loss,
                           chunk_size=config.train.loss_chunk_size)


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.dpo's values (what configs.base leaves to the trainer that reads them)."""
  d = config.dpo
  if not d.beta > 0:
    raise ConfigError(f"config.dpo.beta={d.beta} must be > 0")
  if not 0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"config.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
  if d.loss not in dpo.LOSSES:
    raise ConfigError(f"config.dpo.loss={d.loss!r}; choose one of {dpo.LOSSES}")
  if d.loss == "ipo" and d.label_smoothing:
    raise ConfigError("config.dpo.label_smoothing applies to loss='sigmoid' only")


class ReferenceLogprobs(hooks.Hook):
  """Adds {chosen,rejected}_ref_logprobs [B, T] to every train and eval batch: the
  reference's log-probs of the targets (only the response targets' weights are nonzero)."""

  def __init__(self, trainer: loop.Trainer):
    self.reference = Reference()
    self.logprobs = jit_token_logprobs(trainer.layout.graphdef,
                                       trainer.config.train.loss_chunk_size)

  def before_step(self, trainer: loop.Trainer, batch: dict) -> dict:
    params = self.reference.params(trainer)
    out = dict(batch)
    for side in dpo.SIDES:
      out[f"{side}_ref_logprobs"] = self.logprobs(
          params, *(batch[f"{side}_{k}"] for k in ("tokens", "positions", "segment_ids",
                                                    "targets")))
    return out

  before_eval = before_step


TASK = loop.Task(name="dpo", data_format="preference", make_loss=make_loss,
                 batch_keys=dpo.PAIR_KEYS, hooks=(ReferenceLogprobs,))

if __name__ == "__main__":
  sys.exit(cli.main(TASK))
