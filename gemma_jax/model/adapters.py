"""What LoRA and quantization add inside a weight-holding module (Einsum, FeedForward).

A module that holds a weight `name` (Einsum.w, FeedForward.gating_einsum / .linear) also has
  name_lora   None, or a `LoRA` adapter added by gemma_jax.lora.apply
  name_quant  None, or a QuantSpec: then `name` holds codes and `name_scale` the block scales
              (set by gemma_jax.lora.quantize)
and reads the weight through `kernel(module, name, dtype)`. Both are absent from a plain model's
state, so checkpoints, conversion and sharding of plain models are unchanged. The user-facing
API (apply, quantize, merge, the train/frozen split) is gemma_jax.lora; this file is the part
the model code imports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import quant

# The rank dimension of the adapters; sharding.LOGICAL_RULES keeps it whole.
RANK_AXIS = "lora_rank"
# A factor without an `embed` dimension (B of q/kv/gating, A of attn_vec/linear) would be
# replicated on a pure-fsdp mesh, which costs more than the sharded base itself (gemma_2b,
# rank 16: 62 of 78 MB per chip, x3 with Adam). Its other dimensions take these names, whose
# rules add fsdp (sharding.LOGICAL_RULES), so every factor is ZeRO-3 sharded too.
NO_EMBED_AXES = {"mlp": "lora_mlp", "heads": "lora_heads", "kv_heads": "lora_kv_heads",
                 "head_dim": "lora_head_dim"}


def _factor_axes(axes: tuple) -> tuple:
  if "embed" in axes:
    return axes
  return tuple(NO_EMBED_AXES.get(a, a) for a in axes)


def kernel(module: nnx.Module, name: str, dtype) -> jax.Array:
  """module.<name> as dtype: dequantized on the fly when it is stored quantized."""
  value = getattr(module, name)[...]
  spec = getattr(module, f"{name}_quant")
  if spec is None:
    return value.astype(dtype)
  return quant.dequantize(value, getattr(module, f"{name}_scale")[...], spec, dtype)


def add_lora(x: jax.Array, y: jax.Array, adapter: LoRA | None, rng, index: int | None = None
             ) -> jax.Array:
  return y if adapter is None else y + adapter(x, rng, index)


def split_equation(equation: str) -> tuple[str, str, str]:
  """'x,w->out' -> (x, w, out) index strings."""
  inputs, out = equation.replace(" ", "").split("->")
  x_spec, w_spec = inputs.split(",")
  return x_spec, w_spec, out


class LoRA(nnx.Module):
  """y += dropout(x) A B * alpha / rank for a weight used as einsum(equation, x, W).

  A is [*stack, *in_dims, r] and B [*stack, r, *out_dims], where in_dims are W's dimensions
  contracted with x, out_dims the ones kept in the output, and stack W's leading dimensions
  outside the equation (the `layers` axis, kv_einsum's [k, v], gating's [gate, up]); `index`
  picks one entry of the first stack dimension inside the layer scan. A ~ truncated normal
  (std 1 / sqrt(fan-in)), B = 0: a new adapter leaves the model unchanged. Both carry logical
  axes derived from W's (NO_EMBED_AXES), with the rank axis RANK_AXIS. Dropout needs an rng and
  deterministic=False (Module.eval() sets it True).
  """

  def __init__(self, equation: str, w_shape: tuple[int, ...], w_axes: tuple[str | None, ...],
               *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    x_spec, w_spec, out_spec = split_equation(equation)
    n_stack = len(w_shape) - len(w_spec)
    dims = dict(zip(w_spec, zip(w_shape[n_stack:], w_axes[n_stack:])))
    ins = [c for c in w_spec if c in x_spec and c not in out_spec]
    outs = [c for c in w_spec if c in out_spec and c not in x_spec]
    if len(ins) + len(outs) != len(w_spec):
      raise ValueError(f"LoRA: cannot split the weight of {equation!r} into input and output "
                       "dimensions")
    r = next(c for c in "rzyxwvu" if c not in equation)
    batch = "".join(c for c in x_spec if c not in w_spec)
    self.down = f"{x_spec},{''.join(ins)}{r}->{batch}{r}"
    self.up = f"{batch}{r},{r}{''.join(outs)}->{out_spec}"
    stack_shape, stack_axes = tuple(w_shape[:n_stack]), tuple(w_axes[:n_stack])
    in_shape = tuple(dims[c][0] for c in ins)
    a_shape = (*stack_shape, *in_shape, rank)
    a_axes = (*stack_axes, *(dims[c][1] for c in ins), RANK_AXIS)
    b_shape = (*stack_shape, rank, *(dims[c][0] for c in outs))
    b_axes = (*stack_axes, RANK_AXIS, *(dims[c][1] for c in outs))
    fan_in = 1
    for n in in_shape:
      fan_in *= n
    a = fan_in ** -0.5 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, a_shape,
                                                     param_dtype)
    self.a = nnx.LoRAParam(a, axes=_factor_axes(a_axes))
    self.b = nnx.LoRAParam(jnp.zeros(b_shape, param_dtype), axes=_factor_axes(b_axes))
    self.scale = alpha / rank
    self.dropout = dropout
    self.deterministic = False
    # How to rebuild W's dimension order from A and B (merging): stack letters + w_spec.
    self.merge_equation = self._merge_equation(n_stack, ins, outs, w_spec, r)

  @staticmethod
  def _merge_equation(n_stack: int, ins, outs, w_spec: str, r: str) -> str:
    used = set(w_spec) | {r}
    stack = "".join([c for c in "ABCDEFGH" if c not in used][:n_stack])
    return f"{stack}{''.join(ins)}{r},{stack}{r}{''.join(outs)}->{stack}{w_spec}"

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               index: int | None = None) -> jax.Array:
    a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
    if index is not None:
      a, b = a[index], b[index]
    if self.dropout > 0 and not self.deterministic and rng is not None:
      if index is not None:
        rng = jax.random.fold_in(rng, index)
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros_like(x))
    h = jnp.einsum(self.down, x, a)
    return jnp.einsum(self.up, h, b) * jnp.asarray(self.scale, x.dtype)

  def delta(self) -> jax.Array:
    """alpha / rank * A B in W's layout (float32), for merging into W."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return jnp.einsum(self.merge_equation, a, b) * self.scale
