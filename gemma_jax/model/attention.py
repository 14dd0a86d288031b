"""Multi-head / multi-query / grouped-query attention with Gemma's options.

One code path covers every layer kind: the sliding window, RoPE base and position scale are
values (they vary across scanned layers), soft-capping and QK-norm are config switches.
With a KV cache the same path runs over the cache slots instead of the call's own tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gemma_jax.config import ModelConfig
from gemma_jax.remat import KEY_PROJ, QUERY_PROJ, VALUE_PROJ
from gemma_jax.model import attention_impl
from gemma_jax.model.adapters import add_lora, kernel
from gemma_jax.model.cache import KVCache
from gemma_jax.model.layers import (RMSNorm, apply_rope, make_param, softcap, stacked,
                                    weight_einsum)

# Finite "minus infinity": a fully masked row (padding) stays finite instead of NaN.
MASK_VALUE = -2.3819763e38
NO_WINDOW = 2**30
# A sequence attending to itself is split into this many query chunks, each reading only the
# keys up to its own end: causal attention never looks further, so 4 chunks skip 3/8 of the
# logits (and their memory) exactly. Shorter chunks than the minimum cost more in per-op
# overhead and compile time than they save.
QUERY_CHUNKS = 4
MIN_QUERY_CHUNK = 64


class Einsum(nnx.Module):
  """A weight `w` applied with a fixed einsum equation (names follow the official checkpoints)."""

  def __init__(self, equation: str, shape, axes, stddev: float, *, param_dtype, rngs,
               num_layers=None):
    self.equation = equation
    shape, axes = stacked(num_layers, shape, axes)
    self.w = make_param(rngs, shape, axes, param_dtype, stddev)
    # A LoRA adapter and quantization of w (see model/adapters.py); None = plain.
    self.w_lora = nnx.data(None)
    self.w_quant = None

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """rng: LoRA dropout key (None: no dropout)."""
    return add_lora(x, weight_einsum(self.equation, x, kernel(self, "w", x.dtype)), self.w_lora,
                    rng)

  def each(self, x: jax.Array, rng: jax.Array | None = None) -> list[jax.Array]:
    """The equation applied with each slice of w's leading axis (kv_einsum: keys, values).

    Plain dots per slice: one einsum over the stack makes XLA:CPU transpose the whole
    weight at every call, which dominates a decode step there.
    """
    w = kernel(self, "w", x.dtype)
    return [add_lora(x, weight_einsum(self.equation, x, w[i]), self.w_lora, rng, i)
            for i in range(w.shape[0])]


def attention_mask(q_positions, q_segments, k_positions, k_segments, window) -> jax.Array:
  """[B, Tq, Tk] visibility: same non-padding segment, causal, within the sliding window.

  Causality and the window are read from positions, which increase along each segment
  (padding = segment 0 sees nothing and is seen by nothing). window may be traced;
  NO_WINDOW disables it.
  """
  qp, kp = q_positions[:, :, None], k_positions[:, None, :]
  same_segment = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
  return same_segment & (kp <= qp) & (qp - kp < window)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, num_layers=None):
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, num_layers=num_layers)
    self.q_einsum = Einsum("btd,ndh->btnh", (n, d, h), ("heads", "embed", "head_dim"),
                           d ** -0.5, **kw)
    self.kv_einsum = Einsum("btd,kdh->btkh", (2, k, d, h),
                            (None, "kv_heads", "embed", "head_dim"), d ** -0.5, **kw)
    self.attn_vec_einsum = Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"),
                                  (n * h) ** -0.5, **kw)
    if cfg.use_qk_norm:
      norm_kw = dict(eps=cfg.norm_eps, param_dtype=kw["param_dtype"], num_layers=num_layers)
      self.query_norm = RMSNorm(h, "head_dim", **norm_kw)
      self.key_norm = RMSNorm(h, "head_dim", **norm_kw)
    self.use_qk_norm = cfg.use_qk_norm
    self.config = cfg
    self.query_scale = cfg.query_pre_attn_scalar ** -0.5
    self.logits_softcap = cfg.attn_logits_softcap

  def __call__(self, x, positions, segment_ids, *, window, rope_base, rope_scale,
               cache: KVCache | None = None, layer: jax.Array | int = 0,
               rng: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """x [B, T, D] -> (output [B, T, D], cache with this call's keys/values written).

    Without a cache the tokens attend to each other. With one (whose slot positions/segment
    ids already include these tokens) they attend to every slot of this `layer`.
    rng: LoRA dropout key (None: no dropout).
    """
    rngs = (None,) * 3 if rng is None else tuple(jax.random.split(rng, 3))
    q = checkpoint_name(self.q_einsum(x, rngs[0]), QUERY_PROJ)
    k, v = self.kv_einsum.each(x, rngs[1])
    k, v = checkpoint_name(k, KEY_PROJ), checkpoint_name(v, VALUE_PROJ)
    if self.use_qk_norm:
      q, k = self.query_norm(q), self.key_norm(k)
    q = apply_rope(q, positions, rope_base, rope_scale) * jnp.asarray(self.query_scale, x.dtype)
    k = apply_rope(k, positions, rope_base, rope_scale)
    if cache is None:
      out = self._self_attention(q, k, v, positions, segment_ids, window)
    elif cache.ring and static_window(window) is not None:
      if q.shape[1] == 1:
        # Decoding one token per row: its key replaces only the one that left its window, so
        # it can attend to the ring after the write. Reading the ring before a write to it,
        # XLA on CPU copied the whole ring stack in every layer (decode 2x slower in float32).
        cache = cache.write_ring_kv(layer, positions, segment_ids, k, v)
        mask = attention_mask(positions, segment_ids,
                              *cache.ring_slots_with(positions, segment_ids), window)
        out = dot_product_attention(q, cache.ring_k[layer], cache.ring_v[layer], mask,
                                    self.logits_softcap)
      else:
        out = self._ring_attention(q, k, v, positions, segment_ids, window, cache, layer)
        cache = cache.write_ring_kv(layer, positions, segment_ids, k, v)
    else:
      cache = cache.write_kv(layer, k, v)
      mask = attention_mask(positions, segment_ids, cache.positions, cache.segment_ids, window)
      out = dot_product_attention(q, cache.k[layer], cache.v[layer], mask, self.logits_softcap)
    return self.attn_vec_einsum(out, rngs[2]), cache

  def _ring_attention(self, q, k, v, positions, segment_ids, window, cache, layer):
    """A local layer over its ring as it was before this call, and the call's own tokens:
    every key the full cache would show within the window (cache.py)."""
    keys = [jnp.concatenate([ring[layer], new.astype(ring.dtype)], axis=1)
            for ring, new in ((cache.ring_k, k), (cache.ring_v, v))]
    mask = attention_mask(positions, segment_ids,
                          jnp.concatenate([cache.ring_positions, positions], axis=1),
                          jnp.concatenate([cache.ring_segment_ids, segment_ids], axis=1), window)
    return dot_product_attention(q, *keys, mask, self.logits_softcap)

  def _self_attention(self, q, k, v, positions, segment_ids, window):
    """The tokens attending to each other, by the configured implementation."""
    impl = attention_impl.resolve(self.config, q.shape[1])
    if impl == "xla":
      mask = attention_mask(positions, segment_ids, positions, segment_ids, window)
      return causal_attention(q, k, v, mask, self.logits_softcap)
    return attention_impl.self_attention(
        impl, q, k, v, segment_ids, window=static_window(window), softcap=self.logits_softcap,
        interpret=self.config.attention_interpret)


def static_window(window) -> int | None:
  """A layer's window as a Python int (None for a global layer), as the fused kernels and
  the ring cache need it: the layers must run with static kinds (transformer.py)."""
  if isinstance(window, jax.core.Tracer):
    raise TypeError("a fused attention kernel needs a static sliding window; the layer scan "
                    "passed a traced one")
  window = int(window)
  return None if window >= NO_WINDOW else window


def causal_attention(q, k, v, mask, logits_softcap):
  """dot_product_attention of tokens attending to each other (k, v from the same tokens as q).

  Query chunk i reads keys up to the chunk's end only: every key after it is masked anyway
  while positions increase along each segment (see attention_mask). Fully masked rows
  (padding) then average fewer values than in dot_product_attention; nothing reads them.
  """
  t = q.shape[1]
  chunks = QUERY_CHUNKS if t % QUERY_CHUNKS == 0 and t >= QUERY_CHUNKS * MIN_QUERY_CHUNK else 1
  size = t // chunks
  return jnp.concatenate([
      dot_product_attention(q[:, i * size:end], k[:, :end], v[:, :end],
                            mask[:, i * size:end, :end], logits_softcap)
      for i, end in enumerate(range(size, t + 1, size))], axis=1)


def dot_product_attention(q, k, v, mask, logits_softcap):
  """q [B,T,N,H] (already scaled), k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H].

  Query head n reads kv head n // (N // K). Logits, soft-cap and softmax in float32.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = softcap(logits, logits_softcap)
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)
