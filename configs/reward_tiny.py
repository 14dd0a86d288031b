"""CPU demo: a tiny Gemma 3 reward model that learns to prefer digits over number words.

  python -m trainers.reward --config configs/reward_tiny.py --workdir /tmp/reward_tiny

Pairs from configs/data (make_rlhf_sets.py): "It is 19." (chosen) vs "It is nineteen."
(rejected); evaluated on 64 held-out pairs of other questions. The workdir can then score
RLHF rollouts: --config.rlhf.reward_model=/tmp/reward_tiny with configs/rlhf_tiny.py.
"""

import pathlib

from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "configs" / "data"


def get_config():
  c = tiny.tiny_base()
  c.data.update(format="preference", packing="first_fit",
                sources=({"path": str(DATA / "reward_pairs_train.jsonl")},))
  c.train.update(steps=60, global_batch_size=8, seq_len=64)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0)
  c.eval.update(every=20, batches=2, sources=({"path": str(DATA / "reward_pairs_heldout.jsonl")},))
  c.checkpoint.update(every=30, keep=2)
  c.logging.every = 10
  return c
