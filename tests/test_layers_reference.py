"""RMSNorm, RoPE, the attention mask and soft-capped GQA attention against float64 NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.model import apply_rope, attention_mask, dot_product_attention, rms_norm

RNG = np.random.default_rng(0)


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + scale)


def np_rope(x, positions, base, scale):
  """Rotates each pair (x[i], x[i + H/2]) by angle pos / scale / base^(2i/H), written per pair."""
  out = np.empty_like(x)
  half = x.shape[-1] // 2
  for i in range(half):
    angle = positions / scale / base ** (2 * i / x.shape[-1])  # [B, T]
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]  # broadcast over heads
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * c - b * s
    out[..., i + half] = b * c + a * s
  return out


def np_attention(q, k, v, positions, segments, window, cap):
  """Loop over batch, query head and query position; GQA head n reads kv head n // group."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for head in range(n):
      for i in range(t):
        visible = [j for j in range(t) if segments[bi, j] != 0 and segments[bi, j] == segments[bi, i]
                   and positions[bi, j] <= positions[bi, i]
                   and positions[bi, i] - positions[bi, j] < window]
        if not visible:
          continue
        logits = np.array([q[bi, i, head] @ k[bi, j, head // group] for j in visible])
        if cap is not None:
          logits = cap * np.tanh(logits / cap)
        w = np.exp(logits - logits.max())
        out[bi, i, head] = (w / w.sum()) @ v[bi, visible, head // group]
  return out


def test_rms_norm():
  x, scale = RNG.normal(size=(3, 5, 32)) * 4, RNG.normal(size=32)
  got = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), 1e-6)
  np.testing.assert_allclose(got, np_rms_norm(x, scale, 1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("base,scale", [(10_000.0, 1.0), (1_000_000.0, 8.0)])
def test_rope(base, scale):
  x = RNG.normal(size=(2, 7, 3, 16))
  positions = np.stack([np.arange(7), np.arange(100, 107)])
  got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), base, scale)
  np.testing.assert_allclose(got, np_rope(x, positions, base, scale), rtol=1e-5, atol=1e-5)


def test_rope_preserves_relative_angles():
  """q.k after RoPE depends only on the position difference."""
  q, k = RNG.normal(size=(1, 1, 1, 16)), RNG.normal(size=(1, 1, 1, 16))
  dot = lambda pq, pk: float(np.sum(
      np.asarray(apply_rope(jnp.asarray(q, jnp.float32), jnp.array([[pq]]), 10_000.0))
      * np.asarray(apply_rope(jnp.asarray(k, jnp.float32), jnp.array([[pk]]), 10_000.0))))
  assert dot(9, 4) == pytest.approx(dot(105, 100), rel=1e-4)
  assert dot(9, 4) != pytest.approx(dot(9, 5), rel=1e-2)


@pytest.mark.parametrize("window,cap,kv_heads", [(2**30, None, 4), (3, 50.0, 2), (5, 0.7, 1)])
def test_attention_matches_loop_reference(window, cap, kv_heads):
  b, t, n, h = 2, 9, 4, 8
  q = RNG.normal(size=(b, t, n, h)) * 2
  k, v = RNG.normal(size=(2, b, t, kv_heads, h))
  # Row 0: one document; row 1: two packed documents and right padding.
  positions = np.array([np.arange(t), [0, 1, 2, 3, 0, 1, 2, 0, 0]])
  segments = np.array([[1] * t, [1, 1, 1, 1, 2, 2, 2, 0, 0]])
  mask = attention_mask(*map(jnp.asarray, (positions, segments, positions, segments)), window)
  got = dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), mask, cap)
  want = np_attention(q, k, v, positions, segments, window, cap)
  valid = segments != 0
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()
