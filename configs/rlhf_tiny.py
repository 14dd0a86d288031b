"""CPU demo: RLOO on a tiny Gemma 3 with a programmatic reward (answer with digits).

  python -m trainers.rlhf --config configs/rlhf_tiny.py --workdir /tmp/rlhf_tiny
  python -m trainers.plot /tmp/rlhf_tiny        # reward and KL curves in rlhf.png

64 arithmetic prompts (configs/data/rlhf_prompts.jsonl), 8 per step, 4 completions each of up
to 8 tokens, scored by gemma_jax.rewards:digits_answer (the fraction of digit characters, +1
for the right answer). The policy starts from a random init (the reference is that same
init), so the mean reward starts near the chance level of digit tokens and rises as the
policy learns to emit digits, held back from collapsing by the KL penalty.
With --config.rlhf.reward_fn= --config.rlhf.reward_model=WORKDIR, a reward model trained by
configs/reward_tiny.py scores instead.
"""

import pathlib

from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = str(ROOT / "configs" / "data" / "rlhf_prompts.jsonl")


def get_config():
  c = tiny.tiny_base()
  c.data.update(format="rl", sources=({"path": PROMPTS},))
  c.train.update(steps=120, global_batch_size=8, seq_len=32)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0)
  c.rlhf.update(k=4, max_new_tokens=8, temperature=1.0, beta=0.04,
                reward_fn="gemma_jax.rewards:digits_answer", samples_logged=2)
  c.checkpoint.update(every=50, keep=2)
  c.logging.every = 10
  return c
