"""KV cache for decoding: keys and values in fixed slots that carry their own positions.

Each slot stores the position and segment id of the token whose key/value it holds
(segment 0 = empty), so `attention_mask` builds causality, the sliding window and padding
from the slots exactly as it does for an uncached sequence; slot order does not matter.
Every row writes the same slots when `index` is a scalar, so a ragged batch is just a batch
whose padding slots stay segment 0; with `index` [B] (the serving engine, whose rows join and
leave at different times) each row writes at its own index and writes past the end are
dropped. The stacked cache rides in the layer scan's carry and each layer updates its slice
in place (scanning it as xs/ys would copy all of it at every step). Every layer keeps the
full length (one stacked shape); a window-sized ring buffer for local layers would save
memory but is not done here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma_jax.config import ModelConfig

# Logical axis names of each field, for the sharding rules.
CACHE_AXES = {
    "k": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),
    "positions": ("batch", "cache_length"),
    "segment_ids": ("batch", "cache_length"),
    "index": (),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """k, v [layers, B, S, K, H]; positions and segment_ids [B, S] int32 per slot (shared by
  the layers); index [] or [B] int32 = the next slot to write (shared or per row). Writing
  past the end is clamped by XLA for a shared index (dropped for a per-row one), so size the
  cache for the prompt plus every token to be generated."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  index: jax.Array

  @property
  def length(self) -> int:
    return self.positions.shape[1]

  def write_slots(self, positions: jax.Array, segment_ids: jax.Array) -> KVCache:
    """Record the positions and segment ids of the T tokens about to be written at index."""
    if self.index.ndim:
      rows, slots = self._row_slots(positions.shape[1])
      return dataclasses.replace(
          self, positions=self.positions.at[rows, slots].set(positions, mode="drop"),
          segment_ids=self.segment_ids.at[rows, slots].set(segment_ids, mode="drop"))
    at = (0, self.index)
    return dataclasses.replace(
        self,
        positions=jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), at),
        segment_ids=jax.lax.dynamic_update_slice(self.segment_ids,
                                                 segment_ids.astype(jnp.int32), at))

  def write_kv(self, layer: jax.Array | int, k: jax.Array, v: jax.Array) -> KVCache:
    """Store one layer's k, v [B, T, K, H] in slots index .. index + T - 1."""
    if self.index.ndim:
      rows, slots = self._row_slots(k.shape[1])
      put = lambda cache, new: cache.at[layer, rows, slots].set(new.astype(cache.dtype),
                                                                mode="drop")
      return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))
    at = (layer, 0, self.index, 0, 0)
    return dataclasses.replace(
        self, k=jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
        v=jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at))


  def _row_slots(self, t: int) -> tuple[jax.Array, jax.Array]:
    """[B, 1] row and [B, T] slot indices of T tokens written at each row's own index."""
    rows = jnp.arange(self.index.shape[0])[:, None]
    return rows, self.index[:, None] + jnp.arange(t)[None]


def init_cache(cfg: ModelConfig, batch_size: int, length: int, dtype=None, *,
               per_row: bool = False) -> KVCache:
  """An empty cache of `length` slots per row, in the compute dtype unless given;
  per_row: one write index per row instead of a shared one."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  kv_shape = (cfg.num_layers, batch_size, length, cfg.num_kv_heads, cfg.head_dim)
  slots = lambda: jnp.zeros((batch_size, length), jnp.int32)  # distinct buffers: donatable
  return KVCache(k=jnp.zeros(kv_shape, dtype), v=jnp.zeros(kv_shape, dtype), positions=slots(),
                 segment_ids=slots(),
                 index=jnp.zeros((batch_size,) if per_row else (), jnp.int32))
