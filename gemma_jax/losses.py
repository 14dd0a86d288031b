"""Token cross-entropy of tied logits, as (sum, weight) pairs so accumulation and means are exact.

Gemma's vocabulary is 256K: [tokens, vocab] float32 logits would dominate memory, so everything
here starts from the final hidden states and the tied embedding table [V, D] and runs over token
chunks, holding one chunk's logits at a time:
- `chunked_cross_entropy` is the one-device core: a loop over chunks that, when there are several,
  rematerialises each chunk's logits in the backward pass.
- `token_cross_entropy` is the loss to call. Without a mesh it is the core. On the mesh set with
  `jax.set_mesh` every chip computes the logits of its own tokens only (split over the batch
  axes) against its vocabulary slice (over `tensor`), one tile of `vocab_tile` table rows at a
  time: a tile is gathered over its embed shards (in the compute dtype, as ZeRO-3 gathers any
  weight), every token chunk meets it, and the softmax statistics combine over the tiles (online
  logsumexp) and over `tensor`. The backward (a custom VJP) gathers each tile once more and
  reduce-scatters that tile's gradient at once. So the whole table is gathered once in each
  direction and its gradient reduced once, as with an untiled gather, but a chip never holds
  more than a tile of the gathered table or of its float32 gradient.
- `token_logprobs`: per-token log-probs and entropies (RLHF scoring, no gradient) of each chip's
  own tokens; it gathers the whole table (its slice of the vocabulary) once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma_jax import sharding
from gemma_jax.model.layers import softcap, weight_einsum

# Table rows per tile of the sharded loss (a divisor of a chip's vocabulary slice at most
# this): Gemma's 256,000 rows in 16 tiles of 16,000, 262,144 in 16 of 16,384.
VOCAB_TILE = 16384


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """(sum of weighted -log p(target) [+ z_loss * logsumexp^2], sum of weights)."""
  logits = logits.astype(jnp.float32)
  lse, target_logit = _normaliser_and_target(logits, targets, None)
  per_token = lse - target_logit + z_loss * lse**2
  return jnp.sum(per_token * weights), jnp.sum(weights)


def _normaliser_and_target(logits, targets, vocab_axis):
  """(logsumexp, target logit) of each row of logits [..., V] (float32)."""
  if vocab_axis is None:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse, jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  size = logits.shape[-1]
  top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), vocab_axis)
  lse = top + jnp.log(_vocab_sum(jnp.sum(jnp.exp(logits - top[..., None]), -1), vocab_axis))
  local = targets - jax.lax.axis_index(vocab_axis) * size
  mine = (local >= 0) & (local < size)
  picked = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[..., None], axis=-1)[..., 0]
  return lse, _vocab_sum(jnp.where(mine, picked, 0.0), vocab_axis)


def _vocab_sum(x, vocab_axis):
  """x summed over the vocabulary slices (a no-op when the vocabulary is whole)."""
  return x if vocab_axis is None else jax.lax.psum(x, vocab_axis)


def _logits(x, table, final_softcap, vocab_axis):
  if vocab_axis is not None:  # x meets a vocabulary slice: its gradient sums over the slices
    x = jax.lax.pcast(x, vocab_axis, to="varying")
  return softcap(weight_einsum("nd,vd->nv", x, table.astype(x.dtype), jnp.float32), final_softcap)


def _chunk_loss(x, table, targets, weights, *, final_softcap, z_loss):
  return cross_entropy(_logits(x, table, final_softcap, None), targets, weights, z_loss)


def _chunks(chunk_size: int, features, *per_token):
  """features [..., D] as [chunks, chunk, D] and each per-token array [...] as [chunks, chunk],
  zero-padded to whole chunks (so padding has weight 0)."""
  x = features.reshape(-1, features.shape[-1])
  arrays = [x] + [a.reshape(-1) for a in per_token]
  chunk = min(chunk_size, x.shape[0])
  pad = -x.shape[0] % chunk
  if pad:
    arrays = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
  return [a.reshape(-1, chunk, *a.shape[1:]) for a in arrays]


def chunked_cross_entropy(features, table, targets, weights, *, final_softcap=None,
                          z_loss: float = 0.0, chunk_size: int = 4096):
  """Cross-entropy of tied logits features @ table.T on one device, chunk_size tokens at a time.

  features [..., D] (final-normed), table [V, D], targets/weights [...].
  """
  x, t, w = _chunks(chunk_size, features, targets, weights.astype(jnp.float32))
  body = functools.partial(_chunk_loss, final_softcap=final_softcap, z_loss=z_loss)
  if x.shape[0] > 1:  # one chunk's logits live only from the forward's end to the backward's start
    body = jax.checkpoint(body, prevent_cse=False)

  def step(acc, chunk):
    s, wsum = body(chunk[0], table, chunk[1], chunk[2])
    return (acc[0] + s, acc[1] + wsum), None

  (total, weight), _ = jax.lax.scan(step, (jnp.float32(0), jnp.float32(0)), (x, t, w))
  return total, weight


# ----------------------------------------------------------------------------- on the mesh


def _context_mesh():
  """The mesh set with `jax.set_mesh` when it spans several devices, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def _batch_axes(mesh) -> tuple[str, ...]:
  """The batch axes that split something (collectives over an axis of size 1 are not free)."""
  return tuple(a for a in sharding.batch_axes(mesh) if mesh.shape[a] > 1)


def _shards(mesh, batch: tuple[str, ...], features) -> int:
  """How many batch shards split the rows of features (a ValueError when they cannot)."""
  shards = math.prod(mesh.shape[a] for a in batch)
  if features.shape[0] % shards:
    raise ValueError(f"batch of {features.shape[0]} rows does not split over the "
                     f"{shards} shards of the mesh axes {batch}")
  return shards


def _on_chips(fn, mesh, chunk_size: int, table, per_token, out_specs):
  """shard_map of fn(table, vocab_axis, local chunk size, *per_token) over the whole mesh.

  per_token arrays [B, ...] are split over the batch axes on B, so each chip holds its own
  tokens; the table keeps its rule-table sharding on the vocabulary (vocab_axis, or None when
  whole) and is gathered on the embed dimension. chunk_size counts the tokens of all batch
  shards together: each chip's chunks have chunk_size / shards of them.
  """
  batch = _batch_axes(mesh)
  shards = _shards(mesh, batch, per_token[0])
  table_spec = sharding.logical_to_spec(("vocab", "embed"), table.shape, mesh)
  vocab_axis, embed_axis = table_spec

  def per_chip(table, *local):
    # Varying over the batch axes from here on, so that its gradient's sum over them is one
    # psum outside the chunk loop (and the transpose of the gather one reduce-scatter). The
    # gather is written in the table's dtype, so that the gradient adds up over the chunks in
    # it; XLA gathers the compute-dtype copy, the only one the chunks read.
    table = jax.lax.pcast(table, tuple(a for a in batch if a != embed_axis), to="varying")
    if embed_axis is not None:
      table = jax.lax.all_gather(table, embed_axis, axis=1, tiled=True)
    return fn(table, vocab_axis, -(-chunk_size // shards), *local)

  specs = (table_spec,) + (P(batch),) * len(per_token)
  return jax.shard_map(per_chip, mesh=mesh, in_specs=specs, out_specs=out_specs)(
      table, *per_token)


def token_cross_entropy(features, table, targets, weights, *, final_softcap=None,
                        z_loss: float = 0.0, chunk_size: int = 4096,
                        vocab_tile: int = VOCAB_TILE):
  """(sum, weight) of the cross-entropy of tied logits features @ table.T, in float32.

  features [B, T, D] (final-normed), table [V, D], targets/weights [B, T]; chunk_size tokens
  (of the whole batch) per chunk, padded to whole chunks with weight 0. On the context mesh
  each chip computes only its own tokens' logits on its vocabulary slice, [chunk_size / batch
  shards, vocab_tile] float32 at a time (see the module docstring).
  """
  mesh = _context_mesh()
  if mesh is None:
    return chunked_cross_entropy(features, table, targets, weights, chunk_size=chunk_size,
                                 final_softcap=final_softcap, z_loss=z_loss)
  batch = _batch_axes(mesh)
  shards = _shards(mesh, batch, features)
  table_spec = sharding.logical_to_spec(("vocab", "embed"), table.shape, mesh)
  vocab_axis, embed_axis = table_spec
  local_vocab = table.shape[0] // (mesh.shape[vocab_axis] if vocab_axis else 1)
  tiled = _TiledLoss(final_softcap, z_loss, _divisor_at_most(local_vocab, vocab_tile),
                     vocab_axis, embed_axis, batch)

  def per_chip(table, x, t, w):
    x, t, w = _chunks(-(-chunk_size // shards), x, t, w.astype(jnp.float32))
    return tiled(x, table, t, w)

  specs = (table_spec, P(batch), P(batch), P(batch))
  return jax.shard_map(per_chip, mesh=mesh, in_specs=specs, out_specs=(P(), P()))(
      table, features, targets, weights)


def _varying_like(x, *likes):
  """x typed as varying over every manual mesh axis that `likes` vary over: what a scan
  carry's initial value needs to have its body's type."""
  axes = lambda a: jax.typeof(a).manual_axis_type.varying
  missing = tuple(sorted(frozenset().union(*map(axes, likes)) - axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _divisor_at_most(n: int, most: int) -> int:
  """The largest divisor of n that is at most `most` (tiles must cover the slice evenly)."""
  return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


class _TiledLoss:
  """One chip's (sum, weight) over its token chunks x [n, C, D], with the vocabulary in tiles
  of its table slice [V_local, D / fsdp] (a custom VJP; see the module docstring). Sums are
  over every chip: psum over the batch axes; the gradients are the chip's shards, reduced
  inside the backward (its collectives are explicit, so none is left to autodiff)."""

  def __init__(self, final_softcap, z_loss, tile, vocab_axis, embed_axis, batch_axes):
    self.cap, self.z_loss, self.tile = final_softcap, z_loss, tile
    self.vocab_axis, self.embed_axis, self.batch_axes = vocab_axis, embed_axis, batch_axes
    self.loss = jax.custom_vjp(self._loss)
    self.loss.defvjp(self._forward, self._backward)

  def __call__(self, x, table, t, w):
    return self.loss(x, table, t, w)

  # -- pieces --------------------------------------------------------------------------------

  def _gathered_tile(self, table, i, dtype):
    """Rows [i * tile, (i + 1) * tile) of the local table slice, whole on the embed axis."""
    rows = jax.lax.dynamic_slice_in_dim(table, i * self.tile, self.tile).astype(dtype)
    if self.embed_axis is None:
      return rows
    return jax.lax.all_gather(rows, self.embed_axis, axis=1, tiled=True)

  def _first_id(self, table, i):
    """The vocabulary id of tile i's first row."""
    start = i * self.tile
    if self.vocab_axis is not None:
      start += jax.lax.axis_index(self.vocab_axis) * table.shape[0]
    return start

  def _capped(self, z):
    return z if self.cap is None else self.cap * jnp.tanh(z / self.cap)

  def _logits(self, xc, tab):
    return jnp.einsum("cd,vd->cv", xc, tab, preferred_element_type=jnp.float32)

  # -- forward -------------------------------------------------------------------------------

  def _statistics(self, x, table, t):
    """(logsumexp, target logit) [n, C] over the whole vocabulary."""
    tiles = table.shape[0] // self.tile

    def per_tile(carry, i):
      top, total, picked = carry
      tab, first = self._gathered_tile(table, i, x.dtype), self._first_id(table, i)

      def per_chunk(chunk):
        xc, tc = chunk
        logits = self._capped(self._logits(xc, tab))
        m = jnp.max(logits, axis=-1)
        local = tc - first
        mine = (local >= 0) & (local < self.tile)
        hit = jnp.take_along_axis(logits, jnp.clip(local, 0, self.tile - 1)[:, None], -1)[:, 0]
        return m, jnp.sum(jnp.exp(logits - m[:, None]), -1), jnp.where(mine, hit, 0.0)

      m, s, hit = jax.lax.map(per_chunk, (x, t))
      new_top = jnp.maximum(top, m)
      total = total * jnp.exp(top - new_top) + s * jnp.exp(m - new_top)
      return (new_top, total, picked + hit), None

    zeros = _varying_like(jnp.zeros(t.shape, jnp.float32), x, table)
    (top, total, picked), _ = jax.lax.scan(per_tile, (zeros - jnp.inf, zeros, zeros),
                                           jnp.arange(tiles))
    if self.vocab_axis is not None:  # combine the vocabulary slices
      all_top = jax.lax.pmax(top, self.vocab_axis)
      total = jax.lax.psum(total * jnp.exp(top - all_top), self.vocab_axis)
      top, picked = all_top, jax.lax.psum(picked, self.vocab_axis)
    return top + jnp.log(total), picked

  def _loss(self, x, table, t, w):
    lse, picked = self._statistics(x, table, t)
    total = jnp.sum(w * (lse - picked + self.z_loss * lse**2))
    return (jax.lax.psum(total, self.batch_axes), jax.lax.psum(jnp.sum(w), self.batch_axes))

  def _forward(self, x, table, t, w):
    lse, picked = self._statistics(x, table, t)
    total = jnp.sum(w * (lse - picked + self.z_loss * lse**2))
    out = (jax.lax.psum(total, self.batch_axes), jax.lax.psum(jnp.sum(w), self.batch_axes))
    return out, (x, table, t, w, lse)

  # -- backward ------------------------------------------------------------------------------

  def _backward(self, residuals, cotangents):
    x, table, t, w, lse = residuals
    g = cotangents[0]
    coef, onehot_weight = g * w * (1 + 2 * self.z_loss * lse), g * w
    tiles = table.shape[0] // self.tile
    others = tuple(a for a in self.batch_axes if a != self.embed_axis)

    def per_tile(dx, i):
      tab, first = self._gathered_tile(table, i, x.dtype), self._first_id(table, i)

      def per_chunk(dtab, chunk):
        xc, tc, cc, oc, lc = chunk
        z = self._logits(xc, tab)
        p = jnp.exp(self._capped(z) - lc[:, None])
        onehot = (tc - first)[:, None] == jnp.arange(self.tile)[None]
        dz = cc[:, None] * p - oc[:, None] * onehot
        if self.cap is not None:
          dz = dz * (1 - jnp.tanh(z / self.cap) ** 2)
        dxc = jnp.einsum("cv,vd->cd", dz.astype(x.dtype), tab,
                         preferred_element_type=jnp.float32)
        dtab = dtab + jnp.einsum("cv,cd->vd", dz.astype(x.dtype), xc,
                                 preferred_element_type=jnp.float32)
        return dtab, dxc

      dtab0 = _varying_like(jnp.zeros((self.tile, x.shape[-1]), jnp.float32), x, table)
      dtab, dxs = jax.lax.scan(per_chunk, dtab0, (x, t, coef, onehot_weight, lse))
      if self.embed_axis is not None:  # the transpose of the tile's gather
        dtab = jax.lax.psum_scatter(dtab, self.embed_axis, scatter_dimension=1, tiled=True)
      if others:  # the tokens of the other batch shards met the same rows
        dtab = jax.lax.psum(dtab, others)
      return dx + dxs, dtab.astype(table.dtype)

    dx0 = _varying_like(jnp.zeros(x.shape, jnp.float32), x, table)
    dx, dtable = jax.lax.scan(per_tile, dx0, jnp.arange(tiles))
    if self.vocab_axis is not None:  # every vocabulary slice adds to each token's gradient
      dx = jax.lax.psum(dx, self.vocab_axis)
    return dx.astype(x.dtype), dtable.reshape(table.shape), None, None


def lm_loss(model, batch: dict, rng, *, z_loss: float = 0.0, chunk_size: int = 4096):
  """Next-token cross-entropy (sum, weight) of a Transformer on a batch of tokens, positions,
  segment_ids, targets and loss_weights [B, T], from its tied embedding (token_cross_entropy).
  rng: LoRA dropout (a plain Gemma has no dropout and ignores it)."""
  features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
  return token_cross_entropy(
      features, model.embedder.input_embedding[...], batch["targets"], batch["loss_weights"],
      final_softcap=model.config.final_logits_softcap, z_loss=z_loss, chunk_size=chunk_size)


def _chunked_logprobs(features, table, targets, *, final_softcap, chunk_size, vocab_axis):
  """(log p(targets), entropy), each shaped like targets, on one device."""
  x, t = _chunks(chunk_size, features, targets)

  def one(chunk):
    logits = _logits(chunk[0], table, final_softcap, vocab_axis)
    lse, target_logit = _normaliser_and_target(logits, chunk[1], vocab_axis)
    logp = logits - lse[:, None]
    return target_logit - lse, -_vocab_sum(jnp.sum(jnp.exp(logp) * logp, axis=-1), vocab_axis)

  picked, entropy = jax.lax.map(one, (x, t))
  unpad = lambda a: a.reshape(-1)[:targets.size].reshape(targets.shape)
  return unpad(picked), unpad(entropy)


def token_logprobs(features, table, targets, *, final_softcap=None, chunk_size: int = 4096):
  """(log p(targets), entropy) [B, T] of the tied logits features @ table.T at temperature 1,
  in float32, chunk by chunk; on the context mesh laid out like token_cross_entropy, the
  outputs split over the batch axes. For scoring: no gradient is meant to flow through it."""
  return _per_target(_chunked_logprobs, features, table, targets, final_softcap, chunk_size)


def _per_target(core, features, table, targets, final_softcap, chunk_size):
  """core's two [B, T] outputs per target, on one device or on the context mesh (the
  table's vocabulary sharded, the outputs split over the batch axes)."""
  kw = dict(final_softcap=final_softcap)
  mesh = _context_mesh()
  if mesh is None:
    return core(features, table, targets, chunk_size=chunk_size, vocab_axis=None, **kw)

  def per_chip(table, vocab_axis, chunk, x, t):
    return core(x, table, t, chunk_size=chunk, vocab_axis=vocab_axis, **kw)

  batch = P(_batch_axes(mesh))
  return _on_chips(per_chip, mesh, chunk_size, table, (features, targets), (batch, batch))


def _chunked_scores(features, table, targets, *, final_softcap, chunk_size, vocab_axis):
  """(log p(targets), whether each target is the argmax), shaped like targets, on one device."""
  x, t = _chunks(chunk_size, features, targets)

  def one(chunk):
    logits = _logits(chunk[0], table, final_softcap, vocab_axis)
    lse, target_logit = _normaliser_and_target(logits, chunk[1], vocab_axis)
    top = jnp.max(logits, axis=-1)
    if vocab_axis is not None:
      top = jax.lax.pmax(top, vocab_axis)
    return target_logit - lse, target_logit >= top

  picked, greedy = jax.lax.map(one, (x, t))
  unpad = lambda a: a.reshape(-1)[:targets.size].reshape(targets.shape)
  return unpad(picked), unpad(greedy)


def token_scores(features, table, targets, *, final_softcap=None, chunk_size: int = 4096):
  """(log p(targets) float32, target is the most likely token bool) [B, T] of the tied logits
  at temperature 1: what evaluation needs (lm-evaluation-harness's loglikelihood and
  is_greedy), laid out on the context mesh like token_logprobs."""
  return _per_target(_chunked_scores, features, table, targets, final_softcap, chunk_size)
