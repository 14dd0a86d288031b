"""CPU demo: GRPO on the RLHF arithmetic demo (configs/rlhf_tiny.py's prompts and reward).

  python -m trainers.rlhf --config configs/grpo_tiny.py --workdir /tmp/grpo_tiny
  python -m trainers.plot /tmp/grpo_tiny        # reward and KL curves in loss.png

Per rollout 8 prompts x 4 completions of up to 8 tokens (gemma_jax.rewards:digits_answer),
group-normalised advantages, then 2 passes over the 32 completions in 2 minibatches of 16:
4 optimizer steps per rollout, the ratio against the behaviour policy clipped to [0.8, 1.2],
the KL to the reference (the random init) as a k3 loss term with beta 0.04, token-mean loss.
"""

from configs import rlhf_tiny


def get_config():
  c = rlhf_tiny.get_config()
  c.train.steps = 160  # 40 rollouts
  c.rlhf.update(algorithm="grpo", updates_per_rollout=2, minibatches=2, clip_eps=0.2,
                kl="loss", beta=0.04, normalisation="token")
  c.checkpoint.update(every=40, keep=2)
  return c
