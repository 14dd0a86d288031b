"""CPU default: a tiny Gemma 3 (292,896 parameters) pretrained on the shipped corpus.

  python -m trainers.pretrain --config configs/tiny.py --workdir /tmp/tiny

Needs nothing but this repository: a 512-piece tokenizer is trained on the same text at
start-up (and kept in the workdir). The mesh fills all local devices with fsdp.
"""

import pathlib

from configs import base

CORPUS = str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" /
             "tokenizer_corpus.txt")


def tiny_base():
  """base.get_config() with the tiny Gemma 3 in float32 and a 512-piece tokenizer trained on
  the shipped corpus at start-up: the start of every CPU demo config."""
  c = base.get_config()
  c.model.preset = "tiny_gemma3"
  c.model.dtype = "float32"
  c.tokenizer.train_corpus = CORPUS
  c.tokenizer.vocab_size = 512
  return c


def get_config():
  c = tiny_base()
  c.data.sources = ({"path": CORPUS},)
  c.train.update(steps=300, global_batch_size=8, seq_len=128)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=20)
  # No held-out text ships with the repository: evaluate on the corpus, read in order.
  c.eval.update(every=100, batches=2, sources=({"path": CORPUS},))
  c.checkpoint.update(every=100, keep=2)
  c.logging.every = 20
  return c
