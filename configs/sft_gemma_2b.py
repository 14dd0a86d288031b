"""gemma_2b chat SFT with LoRA on a 16x16 TPU v5e pod (the layout of configs/pod.py).

  python -m trainers.sft --config configs/sft_gemma_2b.py --workdir DIR --distributed \\
      --config.init_from=/models/gemma_2b \\
      --config.tokenizer.path=/models/gemma_2b/tokenizer.model \\
      --config.data.sources="({'path': '/data/chats/*.jsonl'},)" \\
      --config.eval.sources="({'path': '/data/chats_heldout.jsonl'},)" \\
      [--config.lora.quantize=nf4]    # QLoRA
      [--config.lora.rank=0 --config.model.param_dtype=float32 --config.optimizer.learning_rate=2e-5]  # full SFT

Rank-16 adapters (float32, with their Adam moments) on every attention and MLP weight; the
frozen base in bfloat16. 256 chats x 2048 tokens per step (one row per chip). Per-chip memory
of this step, and of full SFT and QLoRA, is in benchmarks/RESULTS.md ("Fine-tuning memory").
"""

from configs import pod


def get_config():
  c = pod.get_config("gemma_2b")
  c.model.param_dtype = "bfloat16"  # the frozen base; adapters are float32
  c.data.update(format="chat", packing="first_fit", truncate_long=True)
  c.train.update(steps=2000, global_batch_size=256, seq_len=2048)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=100, weight_decay=0.0)
  c.lora.update(rank=16, alpha=32.0, dropout=0.05)
  c.eval.update(every=200, batches=4)
  c.samples.update(every=200, max_new_tokens=64, prompts=(
      "Explain in two sentences why bread rises.", "What is 17 times 3?"))
  c.checkpoint.update(every=500, keep=3)
  c.logging.every = 20
  return c
