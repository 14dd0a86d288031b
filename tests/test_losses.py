"""Chunked and vocabulary-parallel (shard_map) cross-entropy against plain full-logits jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import sharding
from gemma_jax.losses import chunked_cross_entropy, cross_entropy, vocab_parallel_cross_entropy
from gemma_jax.model import softcap

B, T, D, V = 8, 12, 16, 64


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
  weights = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
  return x, table, targets, weights


def reference(x, table, targets, weights, cap=None, z_loss=0.0):
  logits = np.einsum("btd,vd->btv", np.float64(x), np.float64(table))
  if cap:
    logits = cap * np.tanh(logits / cap)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights)
  return ((lse - picked + z_loss * lse**2) * w).sum(), w.sum()


def plain(x, table, targets, weights, cap=None, z_loss=0.0):
  return cross_entropy(softcap(jnp.einsum("btd,vd->btv", x, table), cap), targets, weights, z_loss)


@pytest.mark.parametrize("cap,z_loss,chunk", [(None, 0.0, 7), (3.0, 1e-3, 96), (None, 0.0, 1000)])
def test_chunked_matches_reference_and_plain_grads(cap, z_loss, chunk):
  args = inputs()
  got = chunked_cross_entropy(*args, final_softcap=cap, z_loss=z_loss, chunk_size=chunk)
  want = reference(*args, cap=cap, z_loss=z_loss)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g_chunk = jax.grad(lambda x, t: chunked_cross_entropy(
      x, t, *args[2:], final_softcap=cap, z_loss=z_loss, chunk_size=chunk)[0], (0, 1))(*args[:2])
  g_plain = jax.grad(lambda x, t: plain(x, t, *args[2:], cap, z_loss)[0], (0, 1))(*args[:2])
  for a, b in zip(g_chunk, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2), (1, 2, 4), (8, 1, 1)])
def test_vocab_parallel_matches_plain_jit(shape):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  args = inputs(1)
  fn = jax.jit(lambda *a: vocab_parallel_cross_entropy(*a, mesh, final_softcap=5.0, z_loss=1e-3))
  got = fn(*args)
  want = plain(*args, 5.0, 1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = lambda f: jax.grad(lambda x, t: f(x, t, *args[2:])[0], (0, 1))(*args[:2])
  g_vp = jax.jit(lambda: grad(lambda *a: vocab_parallel_cross_entropy(
      *a, mesh, final_softcap=5.0, z_loss=1e-3)))()
  g_plain = grad(lambda *a: plain(*a, 5.0, 1e-3))
  for a, b in zip(g_vp, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_vocab_parallel_keeps_logits_sliced():
  """No device ever holds a [tokens, V] logits buffer: the largest is [tokens/2, V/4]."""
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  args = inputs(2)
  hlo = jax.jit(lambda *a: vocab_parallel_cross_entropy(*a, mesh)).lower(*args).compile().as_text()
  assert f"f32[{B // 2},{T},{V // 4}]" in hlo
  assert f"f32[{B},{T},{V}]" not in hlo and f"f32[{B // 2},{T},{V}]" not in hlo
