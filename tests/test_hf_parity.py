"""Logits of our Gemma 1/2/3 against Hugging Face transformers' independent implementation."""

import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits, hf_model
from model_utils import random_model, random_tokens

CASES = {
    "gemma1": ("tiny_gemma1", {}),
    "gemma2": ("tiny_gemma2", {}),
    # Small caps so that a missing or misplaced soft-cap changes the logits far beyond tolerance.
    "gemma2_small_caps": ("tiny_gemma2", dict(attn_logits_softcap=1.5, final_logits_softcap=2.0)),
    "gemma3": ("tiny_gemma3", {}),
    "gemma3_rope_scale1": ("tiny_gemma3", dict(rope_scale_global=1.0)),
}
SEQ_LEN = 24  # three times the tiny sliding window of 8


def assert_close(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  scale = np.abs(ref).max()
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * scale, f"max abs error {err:.3g} > 1e-4 x logit scale {scale:.3g}"


@pytest.fixture(scope="module", params=list(CASES))
def models(request):
  name, overrides = CASES[request.param]
  cfg, model = random_model(name, seed=3, **overrides)
  return cfg, model, hf_model(cfg, model)


def test_logits_match_hf(models):
  cfg, model, hf = models
  tokens = random_tokens(cfg, (2, SEQ_LEN))
  assert_close(model(jnp.asarray(tokens)), hf_logits(hf, tokens))


def test_padded_and_packed_rows_match_unpadded_hf(models):
  """Right padding, left padding and two packed documents; each document run alone in HF."""
  cfg, model, hf = models
  docs = [random_tokens(cfg, (1, n), seed=n)[0] for n in (20, 15, 10, 14)]
  layouts = [[(0, docs[0])], [(SEQ_LEN - 15, docs[1])], [(0, docs[2]), (10, docs[3])]]
  tokens = np.zeros((3, SEQ_LEN), np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  for row, layout in enumerate(layouts):
    for seg, (start, doc) in enumerate(layout, start=1):
      tokens[row, start:start + len(doc)] = doc
      positions[row, start:start + len(doc)] = np.arange(len(doc))
      segments[row, start:start + len(doc)] = seg
  ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
  assert np.isfinite(ours).all()  # fully masked padding rows must not produce NaN
  for row, layout in enumerate(layouts):
    for start, doc in layout:
      assert_close(ours[row, start:start + len(doc)], hf_logits(hf, doc[None])[0])
