"""gemma_2b reward model on a 16x16 TPU v5e pod (layout of configs/pod.py).

  python -m trainers.reward --config configs/reward_gemma_2b.py --workdir DIR --distributed \
      --config.init_from=SFT_MODEL_DIR --config.tokenizer.path=/path/tokenizer.model \
      --config.data.sources="({'path': '/data/prefs/*.jsonl'},)" \
      --config.eval.sources="({'path': '/data/prefs_heldout.jsonl'},)"

Starts from an SFT model directory (init_from: the backbone; the value head starts fresh).
Pairs are {prompt, chosen, rejected} records; 256 pairs of up to 1024 tokens per step.
"""

from configs import pod


def get_config():
  c = pod.get_config("gemma_2b")
  c.data.update(format="preference", packing="first_fit", sources=())
  c.train.update(global_batch_size=256, seq_len=1024, steps=2000)
  c.optimizer.update(learning_rate=1e-5, warmup_steps=100, weight_decay=0.0)
  c.eval.update(every=200, batches=8)
  c.checkpoint.update(every=500)
  return c
