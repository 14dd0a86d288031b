"""Token cross-entropy as (sum, weight) pairs, so accumulation and token means are exact.

Gemma's vocabulary is 256K: full [tokens, vocab] float32 logits would dominate memory. Both
versions here start from the final hidden states and the tied embedding table instead:
- `chunked_cross_entropy` (plain jit) scans over token chunks and, when there are several,
  rematerialises each chunk's logits in the backward pass, so only [chunk, vocab] logits exist;
- `vocab_parallel_cross_entropy` (shard_map) additionally splits the vocabulary over the
  `tensor` mesh axis: each device holds [tokens/batch-shards, vocab/tensor] logits and the
  softmax normaliser and target logit are combined with explicit psum/pmax collectives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from gemma_jax.model.layers import softcap, weight_einsum


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """(sum of weighted -log p(target) [+ z_loss * logsumexp^2], sum of weights)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  per_token = lse - target_logit + z_loss * lse**2
  return jnp.sum(per_token * weights), jnp.sum(weights)


def _chunk_loss(x, table, targets, weights, final_softcap, z_loss):
  logits = weight_einsum("nd,vd->nv", x, table.astype(x.dtype), jnp.float32)
  return cross_entropy(softcap(logits, final_softcap), targets, weights, z_loss)


def chunked_cross_entropy(features, table, targets, weights, *, final_softcap=None,
                          z_loss: float = 0.0, chunk_size: int = 4096):
  """Cross-entropy of tied logits features @ table.T without materialising all logits.

  features [B, T, D] (final-normed), table [V, D], targets/weights [B, T].
  """
  d = features.shape[-1]
  x, t, w = features.reshape(-1, d), targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)
  n = x.shape[0]
  chunk = min(chunk_size, n)
  pad = -n % chunk
  if pad:  # zero-weight padding up to a whole number of chunks
    x, t, w = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, t, w))
  body = functools.partial(_chunk_loss, final_softcap=final_softcap, z_loss=z_loss)
  if chunk < n:  # one chunk's logits live only from the forward's end to the backward's start
    body = jax.checkpoint(body, prevent_cse=False)

  def step(acc, chunk_inputs):
    x_chunk, t_chunk, w_chunk = chunk_inputs
    s, wsum = body(x_chunk, table, t_chunk, w_chunk)
    return (acc[0] + s, acc[1] + wsum), None

  shape = lambda a: a.reshape(-1, chunk, *a.shape[1:])
  (total, weight), _ = jax.lax.scan(step, (jnp.float32(0), jnp.float32(0)),
                                    (shape(x), shape(t), shape(w)))
  return total, weight


def vocab_parallel_cross_entropy(features, table, targets, weights, mesh: Mesh, *,
                                 final_softcap=None, z_loss: float = 0.0):
  """As `cross_entropy(features @ table.T)`, with the vocabulary split over mesh axis `tensor`.

  Tokens are split over (data, fsdp) like the batch. Each device computes logits for its
  vocabulary slice only; max, normaliser and target logit are combined across `tensor`.
  """
  batch_axes = ("data", "fsdp")
  vocab = table.shape[0]
  if vocab % mesh.shape["tensor"]:
    raise ValueError(f"vocab_size {vocab} is not divisible by mesh.tensor={mesh.shape['tensor']}")

  @functools.partial(
      jax.shard_map, mesh=mesh,
      in_specs=(P(batch_axes), P("tensor"), P(batch_axes), P(batch_axes)),
      out_specs=(P(), P()), check_vma=False)
  def loss(x, table, t, w):
    logits = jnp.einsum("btd,vd->btv", x, table.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    logits = softcap(logits, final_softcap)
    local_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    global_max = jax.lax.pmax(local_max, "tensor")
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - global_max[..., None]), -1), "tensor")
    lse = global_max + jnp.log(sum_exp)
    start = jax.lax.axis_index("tensor") * logits.shape[-1]
    local_t = t - start
    in_slice = (local_t >= 0) & (local_t < logits.shape[-1])
    picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, logits.shape[-1] - 1)[..., None],
                                 axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(in_slice, picked, 0.0), "tensor")
    w = w.astype(jnp.float32)
    per_token = (lse - target_logit + z_loss * lse**2) * w
    return (jax.lax.psum(jnp.sum(per_token), batch_axes),
            jax.lax.psum(jnp.sum(w), batch_axes))

  return loss(features, table, targets, weights)
