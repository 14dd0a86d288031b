"""The Gemma decoder: embedder -> scanned blocks -> final norm -> tied logits.

Gemma 1, 2 and 3 text differ only through ModelConfig fields. Every layer's parameters are
stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile time does not grow
with depth; per-layer differences (sliding window, RoPE base and scale) ride along as scanned
values; a KV cache (stacked on the same leading axis) rides in the scan's carry.
A fused attention kernel (model/attention_impl.py) needs each layer's window as a constant:
then the scan steps over whole periods of the attention pattern (a local/global pair for
Gemma 2, five local and one global for Gemma 3) with the layers of a period unrolled, and
the layers after the last whole period run unrolled. ModelConfig.scan_layers=False runs the
same per-layer function over the same stacked weights in a Python loop instead.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import remat
from gemma_jax.config import ModelConfig
from gemma_jax.sharding import constrain
from gemma_jax.model import attention_impl
from gemma_jax.model.attention import NO_WINDOW, Attention
from gemma_jax.model.cache import KVCache
from gemma_jax.model.layers import FeedForward, RMSNorm, make_param, softcap

# Logical axes of the residual stream; pins the batch split so XLA never trades it for the
# fsdp split of the weights (which would leave whole batches on every device).
ACTIVATION_AXES = ("batch", "length", "act_embed")


class Embedder(nnx.Module):
  """Token table used twice: scaled lookup on the way in, tied logits on the way out."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_embedding = make_param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"),
                                      jnp.dtype(cfg.param_dtype), cfg.embed_dim ** -0.5)
    self.scale = cfg.embed_scale

  def encode(self, tokens: jax.Array, dtype) -> jax.Array:
    x = jnp.take(self.input_embedding[...], tokens, axis=0).astype(dtype)
    return x * jnp.asarray(self.scale, dtype)  # sqrt(d) rounded to the compute dtype, as upstream

  def decode(self, x: jax.Array) -> jax.Array:
    table = self.input_embedding[...].astype(x.dtype)
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)


class Block(nnx.Module):
  """Pre-norm attention and GeGLU MLP, each optionally post-normed (Gemma 2 and 3)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, num_layers=None):
    norm = lambda: RMSNorm(cfg.embed_dim, "embed", eps=cfg.norm_eps,
                           param_dtype=jnp.dtype(cfg.param_dtype), num_layers=num_layers)
    self.pre_attention_norm = norm()
    self.attn = Attention(cfg, rngs=rngs, num_layers=num_layers)
    self.post_attention_norm = norm() if cfg.use_post_attn_norm else None
    self.pre_ffw_norm = norm()
    self.mlp = FeedForward(cfg.embed_dim, cfg.hidden_dim, param_dtype=jnp.dtype(cfg.param_dtype),
                           rngs=rngs, num_layers=num_layers)
    self.post_ffw_norm = norm() if cfg.use_post_ffw_norm else None

  def __call__(self, x, positions, segment_ids, cache: KVCache | None = None,
               layer: jax.Array | int = 0, rng: jax.Array | None = None,
               **layer_values) -> tuple[jax.Array, KVCache | None]:
    """(block output, the cache with this layer's new keys/values; None without a cache).

    rng: LoRA dropout key of this layer (None: no dropout)."""
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    h, cache = self.attn(self.pre_attention_norm(x), positions, segment_ids, cache=cache,
                         layer=layer, rng=rngs[0], **layer_values)
    x = x + (h if self.post_attention_norm is None else self.post_attention_norm(h))
    h = self.mlp(self.pre_ffw_norm(x), rngs[1])
    return x + (h if self.post_ffw_norm is None else self.post_ffw_norm(h)), cache


def layer_values(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Per-layer sliding window, RoPE base and RoPE position scale, scanned with the weights."""
  local = np.array([kind == "local" for kind in cfg.layer_kinds()])
  return dict(
      window=np.where(local, cfg.sliding_window or NO_WINDOW, NO_WINDOW).astype(np.int32),
      rope_base=np.where(local, cfg.rope_base_local, cfg.rope_base_global).astype(np.float32),
      rope_scale=np.where(local, 1.0, cfg.rope_scale_global).astype(np.float32),
  )


class Transformer(nnx.Module):
  """tokens [B, T] (+ positions, segment_ids, optional KV cache) -> logits [B, T, V] float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    self.layers = Block(cfg, rngs=rngs, num_layers=cfg.num_layers)
    self.final_norm = RMSNorm(cfg.embed_dim, "embed", eps=cfg.norm_eps,
                              param_dtype=jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None):
    """Logits; with a cache (see `cached_features`), the pair (logits, updated cache)."""
    if cache is None:
      return self.logits(self.features(tokens, positions, segment_ids))
    features, cache = self.cached_features(tokens, positions, segment_ids, cache)
    return self.logits(features), cache

  def features(self, tokens, positions=None, segment_ids=None, *,
               rng: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype.

    positions default to 0..T-1 and segment_ids to all ones (one unpadded document per
    row). Packed rows restart positions per segment; padding has segment id 0.
    rng: the dropout key of LoRA adapters (gemma_jax.lora); ignored by a plain model.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    return self._run(tokens, positions, segment_ids, None, rng)[0]

  def cached_features(self, tokens, positions, segment_ids, cache: KVCache
                      ) -> tuple[jax.Array, KVCache]:
    """Features of tokens [B, T] written into cache slots index .. index + T - 1.

    The tokens attend to every earlier slot of the same segment (within the window) and to
    each other; positions are required (they continue each row's sequence), segment_ids
    default to ones. Returns the features and the cache advanced by T slots.
    """
    if positions is None:
      raise ValueError("cached_features: positions are required with a KV cache")
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    return self._run(tokens, positions, segment_ids, cache.write_slots(positions, segment_ids))

  def _run(self, tokens, positions, segment_ids, cache: KVCache | None, rng=None):
    cfg = self.config
    x = constrain(self.embedder.encode(tokens, jnp.dtype(cfg.dtype)), ACTIVATION_AXES)
    graphdef, weights = nnx.split(self.layers)

    def layer_fn(static_values=None):
      """One layer's step; static_values: its window and RoPE values as constants (else
      they arrive traced with the weights). cache_layer: its index in its cache stack."""
      def one_layer(carry, per_layer):
        (x, cache), (layer_weights, values, layer, cache_layer) = carry, per_layer
        values = values if static_values is None else static_values
        layer_rng = None if rng is None else jax.random.fold_in(rng, layer)
        x, cache = nnx.merge(graphdef, layer_weights)(x, positions, segment_ids, cache,
                                                      cache_layer, rng=layer_rng, **values)
        return (constrain(x, ACTIVATION_AXES), cache), None

      if cfg.remat_policy == "none":
        return one_layer
      return jax.checkpoint(one_layer, policy=remat.POLICIES[cfg.remat_policy],
                            prevent_cse=False)

    values = layer_values(cfg)
    static = (cache.ring if cache is not None else
              attention_impl.needs_static_window(cfg, tokens.shape[1]))
    if cfg.scan_layers and not static:
      layers = jnp.arange(cfg.num_layers)
      (x, cache), _ = jax.lax.scan(layer_fn(), (x, cache), (weights, values, layers, layers))
    else:
      x, cache = _run_static_kinds(layer_fn, (x, cache), weights, values, cfg,
                                   index_weights=cache is not None)
    if cache is not None:
      cache = cache.advance(positions, segment_ids)
    return self.final_norm(x), cache

  def logits(self, features: jax.Array) -> jax.Array:
    return softcap(self.embedder.decode(features), self.config.final_logits_softcap)


def _run_static_kinds(layer_fn, carry, weights, values, cfg: ModelConfig, *,
                      index_weights: bool = False):
  """The layers with each one's kind, window and RoPE values as constants, as the fused
  attention kernels (static masks) and the ring-buffer cache (a stack per kind) need.

  A scan over whole periods of the attention pattern, each period a scan over each run of
  same-kind layers in it (Gemma 3: five local layers, then one global: two traced layers),
  then the layers after the last whole period the same way. scan_layers=False: a Python
  loop over every layer. Each layer's cache index counts the layers of its kind before it.
  index_weights: each layer takes its weights from the whole stack by index, one slice per
  layer, where slicing periods, then runs, then layers would copy the weights twice more
  (it does on CPU: a memory-bound decode step ran 1.5x slower). Not for differentiation:
  the gradient of an indexed constant is a full-size sum in every step.
  """
  kinds, period = cfg.layer_kinds(), len(cfg.attention_pattern)
  periods = cfg.num_layers // period if cfg.scan_layers else 0
  stack_index = [kinds[:i].count(kind) for i, kind in enumerate(kinds)]
  per_period = {kind: kinds[:period].count(kind) for kind in set(kinds)}
  static = lambda i: jax.tree.map(lambda a: a[i], values)  # numpy scalars

  def run_layers(carry, run_weights, start, n, group=0):
    """Layers start .. start + n - 1 of a period (same kind) of period `group`, weights [n]
    (None with index_weights)."""
    step = layer_fn(static(start))
    if index_weights:
      indexed = step
      step = lambda c, xs: indexed(c, (jax.tree.map(lambda a: a[xs[2]], weights), *xs[1:]))
    offset = jnp.arange(n)
    per_layer = (run_weights, {}, group * period + start + offset,
                 group * per_period[kinds[start]] + stack_index[start] + offset)
    if n == 1 or not cfg.scan_layers:
      for i in range(n):
        carry, _ = step(carry, jax.tree.map(lambda a: a[i], per_layer))
      return carry
    return jax.lax.scan(step, carry, per_layer)[0]

  def runs(first: int, last: int):
    """(start, length) of the maximal same-kind runs of layers first .. last - 1."""
    out, start = [], first
    for i in range(first + 1, last + 1):
      if i == last or kinds[i] != kinds[start]:
        out.append((start, i - start))
        start = i
    return out

  def run_weights(stack, start, n):
    return None if index_weights else jax.tree.map(lambda a: a[start:start + n], stack)

  def one_period(carry, per_period_xs):
    period_weights, group = per_period_xs
    for start, n in runs(0, period):
      carry = run_layers(carry, run_weights(period_weights, start, n), start, n, group)
    return carry, None

  if periods:
    grouped = None if index_weights else jax.tree.map(
        lambda a: a[:periods * period].reshape(periods, period, *a.shape[1:]), weights)
    carry, _ = jax.lax.scan(one_period, carry, (grouped, jnp.arange(periods)))
  for start, n in runs(periods * period, cfg.num_layers):
    carry = run_layers(carry, run_weights(weights, start, n), start, n)
  return carry
