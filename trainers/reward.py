"""Reward model: a scalar head on the Gemma backbone trained on preference pairs.

  python -m trainers.reward --config configs/reward_tiny.py --workdir /tmp/reward   # CPU
  python -m trainers.reward --config configs/reward_gemma_2b.py --workdir DIR --distributed

Loss: -log sigmoid(r_chosen - r_rejected - reward.margin) per pair (Bradley-Terry), with the
reward read at the last real token (gemma_jax/reward_model.py). Metrics: accuracy, margin,
reward mean/std (and eval_* on eval.sources, held-out pairs). The workdir's checkpoints are
what config.rlhf.reward_model names. See trainers/loop.py.
"""

from __future__ import annotations

import functools
import sys

import ml_collections

from gemma_jax.reward_model import PAIR_KEYS, bradley_terry_loss, init_reward_model
from gemma_jax.train_step import LossFn
from trainers import cli, loop


def make_loss(config: ml_collections.ConfigDict) -> LossFn:
  return functools.partial(bradley_terry_loss, margin=config.reward.margin)


TASK = loop.Task(name="reward", data_format="preference", make_loss=make_loss,
                 batch_keys=PAIR_KEYS, make_model=init_reward_model)

if __name__ == "__main__":
  sys.exit(cli.main(TASK))
