"""The ring-buffer KV cache of sliding-window layers against the full-length cache: the same
logits and greedy tokens across the window wrap, for left- and right-padded ragged batches,
packed prefill rows and per-row write indices; and the memory it saves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax.config import get_config
from gemma_jax.model import init_cache
from gemma_jax.model import cache as cache_lib
from gemma_jax.model.cache import uses_ring
from gemma_jax.sampler import Sampler, SamplingParams
from tests.model_utils import random_model, random_tokens

WINDOW = 4


@pytest.fixture(scope="module")
def model():
  return random_model("tiny_gemma3", sliding_window=WINDOW)[1]


@nnx.jit
def run(model, tokens, positions, segments, cache):
  return model(tokens, positions, segments, cache)


def decode_both(model, tokens, positions, segments, steps, length, per_row=False):
  """Prefill then `steps` single-token steps (greedy) continuing each row's last segment,
  with and without the ring: logits of every step of both, and the two final caches."""
  out = []
  for ring in (False, True):
    cache = init_cache(model.config, tokens.shape[0], length, per_row=per_row, ring=ring)
    assert cache.ring == ring
    logits, cache = run(model, tokens, positions, segments, cache)
    # The token after each row's last real one (right padding: not the last column).
    ends = np.where(segments != 0, np.arange(tokens.shape[1]), -1).max(axis=1)
    seen = [logits]
    last = np.asarray(jnp.argmax(logits[np.arange(len(ends)), ends], -1))
    segment = segments.max(axis=1)  # the last segment: packed rows number them in order
    position = np.where(segments == segment[:, None], positions, -1).max(axis=1)
    for _ in range(steps):
      position = position + 1
      logits, cache = run(model, last[:, None].astype(np.int32), position[:, None],
                          segment[:, None], cache)
      seen.append(logits)
      last = np.asarray(jnp.argmax(logits[:, -1], -1))
    out.append((seen, cache))
  return out


def assert_same(full, ring, valid):
  for step, (a, b) in enumerate(zip(full, ring)):
    a, b = np.asarray(a), np.asarray(b)
    mask = valid if step == 0 else np.ones(a.shape[:2], bool)
    np.testing.assert_allclose(b[mask], a[mask], rtol=0, atol=1e-5 * np.abs(a).max(),
                               err_msg=f"step {step}")
    assert (b[mask].argmax(-1) == a[mask].argmax(-1)).all(), f"step {step}"


@pytest.mark.parametrize("left", [True, False])
def test_ragged_batch_matches_full_cache_across_the_wrap(model, left):
  """Prompts of 2, 6 and 9 tokens (window 4) padded to 9, then 11 steps: every row wraps the
  ring several times; right padding leaves gaps in the full cache's slots."""
  lengths, width, steps = (2, 6, 9), 9, 11
  tokens = np.zeros((3, width), np.int32)
  positions = np.zeros((3, width), np.int32)
  segments = np.zeros((3, width), np.int32)
  for row, n in enumerate(lengths):
    cols = slice(width - n, width) if left else slice(0, n)
    tokens[row, cols] = random_tokens(model.config, (n,), seed=row)
    positions[row, cols], segments[row, cols] = np.arange(n), 1
  (full, _), (ring, cache) = decode_both(model, tokens, positions, segments, steps,
                                         width + steps)
  assert cache.ring_k.shape[2] == WINDOW and cache.k.shape[0] == 1  # one global layer
  assert_same(full, ring, segments != 0)


def test_packed_prefill_row_then_decode_its_last_segment(model):
  """A row holding two prompts (positions restart), decoding the second: it sees only its
  own keys, as with the full cache, though both prompts' tokens land on the same ring
  slots. (The ring keeps each row's newest keys: a row continues its last segment.)"""
  tokens = random_tokens(model.config, (2, 12), seed=3)
  positions = np.array([list(range(7)) + list(range(5)), list(range(12))], np.int32)
  segments = np.array([[1] * 7 + [2] * 5, [1] * 12], np.int32)
  (full, _), (ring, _) = decode_both(model, tokens, positions, segments, 6, 20)
  assert_same(full, ring, segments != 0)


def test_per_row_index_chunked_prefill(model):
  """The serving engine's layout: a per-row index and a prompt read in right-padded chunks,
  the last one partly padding, each chunk wider than the window."""
  prompt = random_tokens(model.config, (13,), seed=5)
  results = []
  for ring in (False, True):
    cache = init_cache(model.config, 1, 24, per_row=True, ring=ring)
    for start in range(0, 13, 6):
      chunk = np.zeros((1, 6), np.int32)
      real = prompt[start:start + 6]
      chunk[0, :len(real)] = real
      positions = (start + np.arange(6))[None].astype(np.int32)
      logits, cache = run(model, chunk, positions, (np.arange(6) < len(real))[None].astype(
          np.int32), cache)
    cache = cache.__class__(**{**cache.__dict__, "index": jnp.array([13], jnp.int32)})
    last_logits = [logits[0, len(real) - 1]]
    token = int(jnp.argmax(last_logits[-1]))
    for step in range(8):
      logits, cache = run(model, np.array([[token]], np.int32),
                          np.array([[13 + step]], np.int32), np.ones((1, 1), np.int32), cache)
      last_logits.append(logits[0, 0])
      token = int(jnp.argmax(logits[0, 0]))
    results.append(np.stack(last_logits))
  full, ring = results
  np.testing.assert_allclose(ring, full, rtol=0, atol=1e-5 * np.abs(full).max())
  assert (ring.argmax(-1) == full.argmax(-1)).all()


def test_sampler_with_the_ring_matches_full_cache_greedy(model, monkeypatch):
  cfg = model.config
  prompts = [list(random_tokens(cfg, (n,), seed=n)) for n in (3, 10)]
  params = SamplingParams(max_new_tokens=12)
  got = Sampler(model).generate(prompts, params)
  monkeypatch.setattr(cache_lib, "uses_ring", lambda cfg, length: False)
  full_model = nnx.merge(*nnx.split(model))  # the same weights; a new config: a new trace
  full_model.config = cfg.replace(name="full cache")
  want = Sampler(full_model).generate(prompts, params)
  assert [g.tokens for g in got] == [w.tokens for w in want]


def kv_bytes(cfg, length, ring):
  cache = jax.eval_shape(lambda: init_cache(cfg, 1, length, ring=ring))
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))


@pytest.mark.parametrize("name,ratio", [("gemma3_4b", 0.19), ("gemma3_27b", 0.19)])
def test_ring_saves_local_layers_memory_at_32k(name, ratio):
  """Gemma 3 at 32K: 5 of 6 layers keep 1,024 slots instead of 32,768."""
  cfg = get_config(name)
  assert uses_ring(cfg, 32_768) and not uses_ring(cfg, 1024)
  full, ring = kv_bytes(cfg, 32_768, False), kv_bytes(cfg, 32_768, True)
  kinds = cfg.layer_kinds()
  per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bfloat16
  want = per_slot * (kinds.count("global") * 32_768 + kinds.count("local") * 1024)
  assert abs(ring - want) < 32_768 * 8 + 1024 * 8 + 64  # + positions, segment ids, index
  assert ring / full < ratio
