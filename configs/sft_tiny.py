"""CPU SFT demo: LoRA on the tiny Gemma 3 with the shipped chats (tests/data/chat_sft.jsonl).

  python -m trainers.sft --config configs/sft_tiny.py --workdir /tmp/sft_tiny
      [--config.lora.quantize=nf4]     # QLoRA: the frozen base stored as 4-bit NF4
      [--config.lora.rank=0]           # full fine-tuning instead
      [--config.init_from=workdir/tiny --config.tokenizer.path=workdir/tiny/tokenizer.model
       --config.tokenizer.train_corpus='']   # start from `make demo`'s pretrained tiny model

The last HELD_OUT chats are the held-out eval split (in-memory sources, so the file itself is
not rewritten). Without init_from the base is the seeded random init: the adapters learn the
chat format and short answers only, but every piece (loss masking, adapters, eval, samples,
adapter-only checkpoints) runs as on a real model.
"""

import json
import pathlib

from configs import tiny

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"
CHATS = DATA / "chat_sft.jsonl"
HELD_OUT = 24


def split_chats(path=CHATS, held_out: int = HELD_OUT) -> tuple[tuple, tuple]:
  """(train, held-out) records of a chat JSONL file, in file order."""
  records = tuple(json.loads(line) for line in pathlib.Path(path).read_text().splitlines()
                  if line.strip())
  return records[:-held_out], records[-held_out:]


def get_config():
  c = tiny.tiny_base()
  train, held_out = split_chats()
  c.data.sources = ({"records": train},)
  c.data.update(format="chat", packing="first_fit", truncate_long=True)
  c.train.update(steps=60, global_batch_size=8, seq_len=256)
  c.optimizer.update(learning_rate=1e-2, warmup_steps=10, weight_decay=0.0)
  c.lora.update(rank=8, alpha=16.0, dropout=0.05)
  c.eval.update(every=30, batches=2, sources=({"records": held_out},))
  c.samples.update(every=30, prompts=("What is 7 plus 5?", "Spell the word 'bread' backwards."),
                   max_new_tokens=24)
  c.checkpoint.update(every=30, keep=2)
  c.logging.every = 10
  return c
