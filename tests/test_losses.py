"""The vocabulary losses against float64 NumPy references, on one device and on meshes of the 8
emulated CPU devices; and, from the compiled program, that no collective moves logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import sharding
from gemma_jax.losses import (VOCAB_TILE, chunked_cross_entropy, cross_entropy,
                              token_cross_entropy, token_logprobs)
from gemma_jax.model import softcap

B, T, D, V = 8, 12, 16, 64
# (data, fsdp, tensor); (1, 1, 1) is one device.
MESHES = [(1, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
# (soft-cap, z_loss, chunk_size): several chunks that divide every shard's tokens, chunks
# padded with zero weights, one chunk.
CASES = [(3.0, 1e-3, 24), (5.0, 0.0, 40), (None, 1e-2, 1000)]


def make_mesh(shape):
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  table = rng.normal(size=(V, D)).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  weights = (rng.random((B, T)) > 0.3).astype(np.float32)
  weights[3] = 0.0  # a whole row of padding
  return x, table, targets, weights


def reference(x, table, targets, weights, cap=None, z_loss=0.0):
  """float64: (loss sum, weight sum, d sum / d x, d sum / d table, log p(target), entropy)."""
  x, table = np.float64(x), np.float64(table)
  z = np.einsum("btd,vd->btv", x, table)
  c = cap * np.tanh(z / cap) if cap else z
  m = c.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(c - m).sum(-1))
  p = np.exp(c - lse[..., None])
  onehot = np.eye(V)[targets]
  picked = (c * onehot).sum(-1)
  total = ((lse - picked + z_loss * lse**2) * weights).sum()
  dc = weights[..., None] * ((1 + 2 * z_loss * lse)[..., None] * p - onehot)
  dz = dc * (1 - np.tanh(z / cap) ** 2) if cap else dc
  dx = np.einsum("btv,vd->btd", dz, table)
  dtable = np.einsum("btv,btd->vd", dz, x)
  entropy = -(p * np.log(p)).sum(-1)
  return total, weights.sum(), dx, dtable, picked - lse, entropy


def on_mesh(shape, fn, *args):
  """fn jitted with the arguments laid out as in the train step (batch split, table by its
  logical axes), under jax.set_mesh."""
  mesh = make_mesh(shape)
  table = sharding.named_sharding(mesh, ("vocab", "embed"), (V, D))
  layout = [table if a.shape == (V, D) else sharding.batch_sharding(mesh, a.ndim) for a in args]
  with jax.set_mesh(mesh):
    return jax.jit(fn)(*(jax.device_put(a, s) for a, s in zip(args, layout)))


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("cap,z_loss,chunk", CASES)
@pytest.mark.parametrize("vocab_tile", [VOCAB_TILE, 8])  # one tile of the slice, or several
def test_cross_entropy_and_gradients_match_float64(shape, cap, z_loss, chunk, vocab_tile):
  x, table, targets, weights = inputs()

  def loss_and_grads(x, table, targets, weights):
    f = lambda x, table: token_cross_entropy(x, table, targets, weights, final_softcap=cap,
                                             z_loss=z_loss, chunk_size=chunk,
                                             vocab_tile=vocab_tile)
    (total, weight), vjp = jax.vjp(f, x, table)
    return total, weight, *vjp((jnp.float32(1), jnp.float32(0)))

  got = on_mesh(shape, loss_and_grads, x, table, targets, weights)
  want = reference(x, table, targets, weights, cap, z_loss)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got[3], want[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("cap,chunk", [(3.0, 24), (None, 40), (5.0, 1000)])
def test_logprobs_and_entropy_match_float64(shape, cap, chunk):
  x, table, targets, _ = inputs(1)
  logp, entropy = on_mesh(shape, lambda x, table, targets: token_logprobs(
      x, table, targets, final_softcap=cap, chunk_size=chunk), x, table, targets)
  want = reference(x, table, targets, np.ones((B, T)), cap)
  np.testing.assert_allclose(logp, want[4], rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(entropy, want[5], rtol=1e-5, atol=2e-6)
  shards = shape[0] * shape[1]
  assert logp.sharding.shard_shape(logp.shape) == (B // shards, T)  # each chip its own rows


def test_compute_dtype_features_keep_float32_table_gradient():
  """bf16 features with a float32 table (the pod's dtypes): the table gradient comes back in
  float32 and both gradients match the float64 ones of the rounded inputs."""
  x, table, targets, weights = inputs(2)
  x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  want = reference(x, np.float32(jnp.asarray(table, jnp.bfloat16)), targets, weights, 3.0)

  def grads(x, table, targets, weights):
    f = lambda x, table: token_cross_entropy(x, table, targets, weights, final_softcap=3.0,
                                             chunk_size=24)[0]
    return jax.grad(f, (0, 1))(x.astype(jnp.bfloat16), table)

  for shape in [(1, 1, 1), (2, 2, 2)]:
    dx, dtable = on_mesh(shape, grads, x, table, targets, weights)
    assert dx.dtype == jnp.bfloat16 and dtable.dtype == jnp.float32
    np.testing.assert_allclose(np.float32(dx), want[2], rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(dtable, want[3], rtol=2e-2, atol=2e-2)


def test_one_device_core_matches_plain_full_logits():
  """Without a mesh the loss is the chunked core, which equals cross_entropy of full logits."""
  x, table, targets, weights = inputs(3)
  plain = lambda x, table: cross_entropy(softcap(jnp.einsum("btd,vd->btv", x, table), 4.0),
                                         targets, weights, 1e-3)[0]
  core = lambda x, table: chunked_cross_entropy(x, table, targets, weights, final_softcap=4.0,
                                                z_loss=1e-3, chunk_size=40)[0]
  np.testing.assert_allclose(token_cross_entropy(x, table, targets, weights, final_softcap=4.0,
                                                 z_loss=1e-3, chunk_size=40)[0],
                             plain(x, table), rtol=2e-6)
  for a, b in zip(jax.grad(core, (0, 1))(x, table), jax.grad(plain, (0, 1))(x, table)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_that_does_not_split_is_named():
  x, table, targets, weights = inputs()
  with jax.set_mesh(make_mesh((1, 8, 1))), pytest.raises(
      ValueError, match="batch of 6 rows does not split over the 8 shards"):
    jax.jit(token_cross_entropy)(x[:6], table, targets[:6], weights[:6])


# ----------------------------------------------------------------------------- compiled HLO

_COLLECTIVE = re.compile(r"= (.*?) (?:all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\((.*?)\)")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def dims(text: str) -> set[tuple[int, ...]]:
  """The shapes written in HLO text."""
  return {tuple(int(d) for d in m.split(",") if d) for m in _SHAPE.findall(text)}


def compiled_hlo(fn, shape):
  """The compiled forward + backward of fn (4 chunks of 24 tokens) on the mesh, with the train
  step's layout: batch split over the batch axes, the table by its logical axes."""
  mesh = make_mesh(shape)
  x, table, targets, weights = inputs()
  grad = jax.grad(lambda x, table: fn(x, table, targets, weights, chunk_size=24)[0], (0, 1))
  shardings = (sharding.batch_sharding(mesh, 3),
               sharding.named_sharding(mesh, ("vocab", "embed"), (V, D)))
  with jax.set_mesh(mesh):
    return jax.jit(grad, in_shardings=shardings).lower(x, table).compile().as_text()


def moved(hlo: str) -> set[tuple[int, ...]]:
  """The result and operand shapes of every collective."""
  return set().union(*(dims(m.group(1) + m.group(2)) for m in _COLLECTIVE.finditer(hlo)))


def vocab_sized(shapes, shape):
  """The shapes with a (per-chip) vocabulary dimension, other than the table and its shards."""
  vocab = V // shape[2]
  return {s for s in shapes if vocab in s} - {(vocab, D), (vocab, D // shape[1])}


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_each_chip_computes_only_its_own_logits(shape):
  """The table is gathered and its gradient reduced, but nothing [tokens, vocab]-shaped crosses
  devices, forward or backward; and the only logits a chip holds are its [24 / batch shards,
  V / tensor] chunk."""
  hlo = compiled_hlo(token_cross_entropy, shape)
  assert vocab_sized(moved(hlo), shape) == set()
  chunk = 24 // (shape[0] * shape[1])
  assert vocab_sized(dims(hlo), shape) == {(chunk, V // shape[2])}


def test_the_check_catches_partial_logits_all_reduced():
  """The one-device core run as plain jit on the fsdp mesh contracts over the fsdp-split embed
  dimension and all-reduces partial [tokens, vocab] logits: what the test above rules out."""
  assert vocab_sized(moved(compiled_hlo(chunked_cross_entropy, (1, 8, 1))), (1, 8, 1))
