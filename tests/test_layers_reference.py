"""RMSNorm, RoPE, the attention mask and soft-capped GQA attention against float64 NumPy;
weight_einsum's hand-written backward against JAX's autodiff of jnp.einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.model import apply_rope, attention_mask, dot_product_attention, rms_norm
from gemma_jax.model import attention
from gemma_jax.model.attention import causal_attention
from gemma_jax.model.layers import weight_einsum

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


@pytest.mark.parametrize("t", [12, 10])  # 4 query chunks of 3; not a multiple of 4: one chunk
@pytest.mark.parametrize("window,cap,kv_heads", [(2**30, None, 4), (3, 50.0, 2), (5, 0.7, 1)])
def test_causal_attention_matches_reference_and_full_gradients(t, window, cap, kv_heads,
                                                               monkeypatch):
  """Skipping the keys after each query chunk changes nothing but the (unread) padding rows."""
  monkeypatch.setattr(attention, "MIN_QUERY_CHUNK", 1)
  b, n, h = 2, 4, 8
  q = RNG.normal(size=(b, t, n, h)) * 2
  k, v = RNG.normal(size=(2, b, t, kv_heads, h))
  # Row 0: one document; row 1: three packed documents and right padding.
  positions = np.array([np.arange(t), [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 0][:t]])
  segments = np.array([[1] * t, [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0][:t]])
  mask = attention_mask(*map(jnp.asarray, (positions, segments, positions, segments)), window)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
  valid = segments != 0
  got = np.asarray(causal_attention(*args, mask, cap))
  want = np_attention(q, k, v, positions, segments, window, cap)
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
  probe = jnp.asarray(RNG.normal(size=q.shape) * valid[:, :, None, None], jnp.float32)
  grads = lambda attend: jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a, mask, cap) * probe),
                                          argnums=(0, 1, 2)))(*args)
  for got, want in zip(grads(causal_attention), grads(dot_product_attention)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("btd,df->btf", (2, 3, 4), (4, 5)),  # MLP gating
    ("btd,ndh->btnh", (2, 3, 4), (2, 4, 5)),  # query projection
    ("btnh,nhd->btd", (2, 3, 2, 5), (2, 5, 4)),  # attention output
    ("nd,vd->nv", (6, 4), (7, 4)),  # tied logits
])
@pytest.mark.parametrize("dtype,preferred", [("float32", None), ("bfloat16", "float32"),
                                             ("bfloat16", None)])
def test_weight_einsum_matches_einsum_and_autodiff(equation, x_shape, w_shape, dtype, preferred):
  x = jnp.asarray(RNG.normal(size=x_shape), dtype)
  w = jnp.asarray(RNG.normal(size=w_shape), dtype)
  out, vjp = jax.vjp(lambda x, w: weight_einsum(equation, x, w, preferred), x, w)
  want_out, want_vjp = jax.vjp(
      lambda x, w: jnp.einsum(equation, x, w, preferred_element_type=preferred), x, w)
  want64 = np.einsum(equation, np.float64(x), np.float64(w))
  tol = 1e-6 if out.dtype == jnp.float32 else 1e-2
  assert out.dtype == want_out.dtype
  np.testing.assert_allclose(np.float64(out), want64, rtol=tol, atol=tol)
  g = jnp.asarray(RNG.normal(size=out.shape), out.dtype)
  for got, want, like in zip(vjp(g), want_vjp(g), (x, w)):
    assert got.dtype == want.dtype == like.dtype
    scale = np.abs(np.float64(want)).max()
    np.testing.assert_allclose(np.float64(got), np.float64(want), rtol=0,
                               atol=(1e-6 if like.dtype == jnp.float32 else 2e-2) * scale)
