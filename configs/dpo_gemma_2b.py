"""gemma_2b DPO with LoRA on a 16x16 TPU v5e pod (the layout of configs/pod.py).

  python -m trainers.dpo --config configs/dpo_gemma_2b.py --workdir DIR --distributed \\
      --config.init_from=SFT_MODEL_DIR --config.tokenizer.path=/models/gemma_2b/tokenizer.model \\
      --config.data.sources="({'path': '/data/prefs/*.jsonl'},)" \\
      --config.eval.sources="({'path': '/data/prefs_heldout.jsonl'},)"

Rank-16 adapters on every attention and MLP weight, the frozen base in bfloat16; the
reference is that base with the initial adapters (B = 0: no second copy of the weights).
256 pairs of up to 1024 tokens per step (chosen and rejected rows: 512 rows, two per chip).
"""

from configs import pod


def get_config():
  c = pod.get_config("gemma_2b")
  c.model.param_dtype = "bfloat16"  # the frozen base; adapters are float32
  c.data.update(format="preference", packing="first_fit", truncate_long=True, sources=())
  c.train.update(steps=1000, global_batch_size=256, seq_len=1024)
  c.optimizer.update(learning_rate=5e-6, warmup_steps=50, weight_decay=0.0)
  c.lora.update(rank=16, alpha=32.0)
  c.dpo.update(beta=0.1)
  c.eval.update(every=100, batches=8)
  c.checkpoint.update(every=250, keep=3)
  c.logging.every = 10
  return c
