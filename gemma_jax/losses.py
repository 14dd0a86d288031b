"""Token cross-entropy of tied logits, as (sum, weight) pairs so accumulation and means are exact.

Gemma's vocabulary is 256K: [tokens, vocab] float32 logits would dominate memory, so everything
here starts from the final hidden states and the tied embedding table [V, D] and runs over token
chunks, holding one chunk's logits at a time:
- `chunked_cross_entropy` is the one-device core: a loop over chunks that, when there are several,
  rematerialises each chunk's logits in the backward pass. Given the `vocab_axis` of a shard_map,
  its table is this device's slice of the vocabulary and the softmax max, normaliser and target
  logit are combined over that axis (vocabulary parallelism).
- `token_cross_entropy` is the loss to call: on the mesh set with `jax.set_mesh` it runs the core
  on every chip over that chip's own tokens (split over the batch axes) and its vocabulary slice
  (over `tensor`), with the table gathered over its embed shards once per call, as ZeRO-3 gathers
  any weight; the table gradient is reduce-scattered once, the transpose of that gather. Without
  a mesh it is the core.
- `token_logprobs`: per-token log-probs and entropies (RLHF scoring), laid out the same way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma_jax import sharding
from gemma_jax.model.layers import softcap, weight_einsum


def cross_entropy(logits, targets, weights, z_loss: float = 0.0, vocab_axis=None):
  """(sum of weighted -log p(target) [+ z_loss * logsumexp^2], sum of weights).

  vocab_axis: logits are this device's slice of the vocabulary along that shard_map axis."""
  logits = logits.astype(jnp.float32)
  lse, target_logit = _normaliser_and_target(logits, targets, vocab_axis)
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


def _chunk_loss(x, table, targets, weights, *, final_softcap, z_loss, vocab_axis):
  logits = _logits(x, table, final_softcap, vocab_axis)
  return cross_entropy(logits, targets, weights, z_loss, vocab_axis)


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
                          z_loss: float = 0.0, chunk_size: int = 4096, vocab_axis=None):
  """Cross-entropy of tied logits features @ table.T on one device, chunk_size tokens at a time.

  features [..., D] (final-normed), table [V, D], targets/weights [...]. vocab_axis: inside a
  shard_map, table is this device's [V / n, D] slice of the vocabulary along that axis.
  """
  x, t, w = _chunks(chunk_size, features, targets, weights.astype(jnp.float32))
  body = functools.partial(_chunk_loss, final_softcap=final_softcap, z_loss=z_loss,
                           vocab_axis=vocab_axis)
  if x.shape[0] > 1:  # one chunk's logits live only from the forward's end to the backward's start
    body = jax.checkpoint(body, prevent_cse=False)
  # Per-chunk sums rather than a carry: no initial value whose shard_map type must match.
  sums, weight_sums = jax.lax.map(lambda c: body(c[0], table, c[1], c[2]), (x, t, w))
  return jnp.sum(sums), jnp.sum(weight_sums)


# ----------------------------------------------------------------------------- on the mesh


def _context_mesh():
  """The mesh set with `jax.set_mesh` when it spans several devices, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def _batch_axes(mesh) -> tuple[str, ...]:
  """The batch axes that split something (collectives over an axis of size 1 are not free)."""
  return tuple(a for a in sharding.batch_axes(mesh) if mesh.shape[a] > 1)


def _on_chips(fn, mesh, chunk_size: int, table, per_token, out_specs):
  """shard_map of fn(table, vocab_axis, local chunk size, *per_token) over the whole mesh.

  per_token arrays [B, ...] are split over the batch axes on B, so each chip holds its own
  tokens; the table keeps its rule-table sharding on the vocabulary (vocab_axis, or None when
  whole) and is gathered on the embed dimension. chunk_size counts the tokens of all batch
  shards together: each chip's chunks have chunk_size / shards of them.
  """
  batch = _batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in batch)
  if per_token[0].shape[0] % shards:
    raise ValueError(f"batch of {per_token[0].shape[0]} rows does not split over the "
                     f"{shards} shards of the mesh axes {batch}")
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
                        z_loss: float = 0.0, chunk_size: int = 4096):
  """(sum, weight) of the cross-entropy of tied logits features @ table.T, in float32.

  features [B, T, D] (final-normed), table [V, D], targets/weights [B, T]; chunk_size tokens
  (of the whole batch) per chunk, padded to whole chunks with weight 0. On the context mesh
  each chip computes only its own tokens' logits on its vocabulary slice, [chunk_size / batch
  shards, V / tensor] float32 at a time (see the module docstring).
  """
  kw = dict(final_softcap=final_softcap, z_loss=z_loss)
  mesh = _context_mesh()
  if mesh is None:
    return chunked_cross_entropy(features, table, targets, weights, chunk_size=chunk_size, **kw)

  def per_chip(table, vocab_axis, chunk, x, t, w):
    out = chunked_cross_entropy(x, table, t, w, chunk_size=chunk, vocab_axis=vocab_axis, **kw)
    return jax.lax.psum(out, _batch_axes(mesh))

  return _on_chips(per_chip, mesh, chunk_size, table, (features, targets, weights),
                   (P(), P()))


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
  kw = dict(final_softcap=final_softcap)
  mesh = _context_mesh()
  if mesh is None:
    return _chunked_logprobs(features, table, targets, chunk_size=chunk_size, vocab_axis=None,
                             **kw)

  def per_chip(table, vocab_axis, chunk, x, t):
    return _chunked_logprobs(x, table, t, chunk_size=chunk, vocab_axis=vocab_axis, **kw)

  batch = P(_batch_axes(mesh))
  return _on_chips(per_chip, mesh, chunk_size, table, (features, targets), (batch, batch))
