"""Supervised fine-tuning on chats: full, LoRA or QLoRA (config.lora).

  python -m trainers.sft --config configs/sft_tiny.py --workdir /tmp/sft          # CPU, ~1 min
  python -m trainers.sft --config configs/sft_gemma3_270m.py --workdir DIR \\
      --config.init_from=models/gemma3_270m                                       # real 270M
  python -m trainers.sft --config configs/sft_gemma_2b.py --workdir DIR --distributed  # TPU pod

The loss is lm_loss on "chat" batches: the data pipeline weights only the model turns (and
their <end_of_turn>), so user and system tokens add nothing to the loss or the gradient. Start
from a model directory with config.init_from; config.eval holds the held-out chats and
config.samples the prompts whose generations are logged. With config.lora.rank > 0 the
checkpoints hold the adapters only: `python -m gemma_jax.lora merge --adapters WORKDIR --out
DIR` folds them into the base. A rerun with the same --workdir resumes. See trainers/loop.py.
"""

from __future__ import annotations

import sys

from trainers import cli, loop
from trainers.pretrain import make_loss

TASK = loop.Task(name="sft", data_format="chat", make_loss=make_loss)

if __name__ == "__main__":
  sys.exit(cli.main(TASK))
