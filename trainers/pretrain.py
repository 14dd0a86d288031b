"""Pretraining: next-token cross-entropy on packed text.

  python -m trainers.pretrain --config configs/tiny.py --workdir /tmp/tiny    # CPU, ~45 s
  python -m trainers.pretrain --config configs/gemma_2b.py --workdir DIR --distributed  # TPU pod
      [--config.a.b=value ...]

A rerun with the same --workdir resumes from its newest checkpoint. See trainers/loop.py.
"""

from __future__ import annotations

import functools
import sys

import ml_collections

from gemma_jax.losses import lm_loss
from gemma_jax.train_step import LossFn
from trainers import cli, loop


def make_loss(config: ml_collections.ConfigDict) -> LossFn:
  return functools.partial(lm_loss, z_loss=config.train.z_loss,
                           chunk_size=config.train.loss_chunk_size)


TASK = loop.Task(name="pretrain", data_format="pretrain", make_loss=make_loss)

if __name__ == "__main__":
  sys.exit(cli.main(TASK))
