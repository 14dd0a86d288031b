"""CPU demo: DPO on a tiny Gemma 3 that learns to prefer digits over number words.

  python -m trainers.dpo --config configs/dpo_tiny.py --workdir /tmp/dpo_tiny
  python -m trainers.plot /tmp/dpo_tiny       # loss, reward accuracy, learning rate

The reward trainer's pairs (configs/data, make_rlhf_sets.py): "It is 19." (chosen) vs "It is
nineteen." (rejected), with 64 held-out pairs of other questions for eval_reward_accuracy.
The policy and its reference start from the same seeded random init: the reference's
log-probs stay fixed while the policy raises the chosen responses' against the rejected
ones. [--config.dpo.loss=ipo] [--config.dpo.label_smoothing=0.1] [--config.lora.rank=8]
"""

from configs import reward_tiny, tiny


def get_config():
  c = tiny.tiny_base()
  train, held_out = (str(reward_tiny.DATA / f"reward_pairs_{split}.jsonl")
                     for split in ("train", "heldout"))
  c.data.update(format="preference", packing="first_fit", sources=({"path": train},))
  c.train.update(steps=40, global_batch_size=8, seq_len=64)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0)
  c.dpo.update(beta=0.1)
  c.eval.update(every=10, batches=2, sources=({"path": held_out},))
  c.checkpoint.update(every=20, keep=2)
  c.logging.every = 5
  return c
