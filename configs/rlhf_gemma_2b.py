"""gemma_2b RLHF (RLOO) on a 16x16 TPU v5e pod (layout of configs/pod.py).

  python -m trainers.rlhf --config configs/rlhf_gemma_2b.py --workdir DIR --distributed \
      --config.init_from=SFT_MODEL_DIR --config.rlhf.reward_model=REWARD_WORKDIR \
      --config.tokenizer.path=/path/tokenizer.model \
      --config.data.sources="({'path': '/data/rl_prompts/*.jsonl'},)"

Per step 256 prompts (up to 512 tokens) x k=4 completions of up to 512 tokens, sampled at
temperature 1 on the same mesh; beta 0.05. Or a programmatic reward:
--config.rlhf.reward_model= --config.rlhf.reward_fn=module:function. LoRA:
--config.lora.rank=16 (the reference then shares the frozen base). Note: the rollout reads the
prompts on one host; multi-host rollouts are not done yet (see trainers/rlhf.py).
"""

from configs import pod


def get_config():
  c = pod.get_config("gemma_2b")
  c.data.update(format="rl", sources=())
  c.train.update(global_batch_size=256, seq_len=512, steps=1000)
  c.optimizer.update(learning_rate=1e-6, warmup_steps=20, weight_decay=0.0)
  c.rlhf.update(k=4, max_new_tokens=512, temperature=1.0, beta=0.05, truncated="penalty",
                truncated_penalty=1.0, samples_logged=4)
  c.checkpoint.update(every=100)
  c.logging.every = 5
  return c
