"""The small pieces of a Gemma block: parameters with logical axes, RMSNorm, RoPE, GeGLU MLP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gemma_jax.model.adapters import add_lora, kernel, split_equation
from gemma_jax.remat import WEIGHT_DOT

Axes = tuple[str | None, ...]


def weight_einsum(equation: str, x: jax.Array, w: jax.Array, preferred_element_type=None
                  ) -> jax.Array:
  """jnp.einsum(equation, x, w) of activations x and a weight w, with a hand-written backward.

  The backward is the textbook pair einsum(out, w -> x), einsum(x, out -> w): autodiff's math,
  spelled so that XLA:CPU transposes the small activation for the weight gradient. From
  autodiff's transposed dot_general it fused the transpose into the large GeGLU derivative
  instead, and the MLP backward ran about 25% slower (benchmarks/RESULTS.md, Training).
  Every index of x must appear in w or in the output. The result is named WEIGHT_DOT.
  """
  return checkpoint_name(_weight_einsum(equation, x, w, preferred_element_type), WEIGHT_DOT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _weight_einsum(equation, x, w, preferred_element_type):
  return jnp.einsum(equation, x, w, preferred_element_type=preferred_element_type)


def _weight_einsum_fwd(equation, x, w, preferred_element_type):
  return _weight_einsum(equation, x, w, preferred_element_type), (x, w)


def _weight_einsum_bwd(equation, preferred_element_type, residuals, g):
  del preferred_element_type  # the gradients take their inputs' dtypes, as in autodiff
  x, w = residuals
  x_spec, w_spec, out = split_equation(equation)
  dx = jnp.einsum(f"{out},{w_spec}->{x_spec}", g, w)
  dw = jnp.einsum(f"{x_spec},{out}->{w_spec}", x, g)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_weight_einsum.defvjp(_weight_einsum_fwd, _weight_einsum_bwd)


def make_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: Axes, dtype,
               stddev: float | None) -> nnx.Param:
  """A parameter carrying its logical axis names (`axes` metadata, read by sharding.py).

  stddev=None means zeros (norm scales, which act as 1 + scale).
  """
  if len(shape) != len(axes):
    raise ValueError(f"parameter of shape {shape} given {len(axes)} axis names {axes}")
  if stddev is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = stddev * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
  return nnx.Param(value, axes=axes)


def stacked(num_layers: int | None, shape: tuple[int, ...], axes: Axes):
  """Prepend the scanned `layers` dimension when the module holds every layer at once."""
  if num_layers is None:
    return shape, axes
  return (num_layers, *shape), ("layers", *axes)


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32."""

  def __init__(self, dim: int, axis_name: str, *, eps: float, param_dtype, num_layers=None):
    self.eps = eps
    shape, axes = stacked(num_layers, (dim,), (axis_name,))
    self.scale = make_param(None, shape, axes, param_dtype, stddev=None)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: jax.Array | float,
               scale: jax.Array | float = 1.0) -> jax.Array:
  """Rotary embedding on the last dim of x [B, T, N, H], split into halves (not interleaved).

  positions [B, T]; base and scale may be traced scalars (they vary across scanned layers).
  Linear position scaling divides positions by `scale`. Computed in float32.
  """
  half = x.shape[-1] // 2
  fraction = 2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1]
  inv_freq = 1.0 / jnp.power(jnp.asarray(base, jnp.float32), fraction)
  angle = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, half]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


class FeedForward(nnx.Module):
  """GeGLU: linear(gelu_tanh(x W_gate) * (x W_up)); gating_einsum stacks [gate, up]."""

  # Per-slice einsum of each weight (gemma_jax.lora builds adapters from these).
  EQUATIONS = {"gating_einsum": "btd,df->btf", "linear": "btf,fd->btd"}

  def __init__(self, embed_dim: int, hidden_dim: int, *, param_dtype, rngs, num_layers=None):
    shape, axes = stacked(num_layers, (2, embed_dim, hidden_dim), (None, "embed", "mlp"))
    self.gating_einsum = make_param(rngs, shape, axes, param_dtype, embed_dim ** -0.5)
    shape, axes = stacked(num_layers, (hidden_dim, embed_dim), ("mlp", "embed"))
    self.linear = make_param(rngs, shape, axes, param_dtype, hidden_dim ** -0.5)
    # LoRA adapters and quantization of the weights (see model/adapters.py); None = plain.
    self.gating_einsum_lora = nnx.data(None)
    self.linear_lora = nnx.data(None)
    self.gating_einsum_quant = None
    self.linear_quant = None

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """rng: LoRA dropout key (None: no dropout)."""
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    # Two dots rather than one einsum over [gate, up]: that einsum makes XLA:CPU transpose
    # the whole weight at every call (10x slower decoding there); other backends don't care.
    gating = kernel(self, "gating_einsum", x.dtype)
    gate, up = (add_lora(x, weight_einsum("btd,df->btf", x, gating[i]), self.gating_einsum_lora,
                         rngs[0], i) for i in range(2))
    hidden = jax.nn.gelu(gate, approximate=True) * up
    out = weight_einsum("btf,fd->btd", hidden, kernel(self, "linear", x.dtype))
    return add_lora(hidden, out, self.linear_lora, rngs[1])
