"""Block-wise weight quantization for a frozen base (QLoRA): int8, int4 and NF4.

A weight is cut into blocks of `block_size` consecutive elements along one axis; each block
keeps one float32 scale (its absolute maximum over the largest code) and one code per element:

  int8  round(w / s), s = absmax / 127, codes in [-127, 127] (int8)
  int4  round(w / s), s = absmax / 7, codes in [-7, 7] (stored + 8, two per byte)
  nf4   nearest of the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023) to w / absmax,
        two codes per byte

Error bound per element: s / 2 for int8/int4; absmax x half the gap between the two NF4 levels
around w / absmax for nf4 (`error_bound`). Double quantization of the scales (QLoRA's second
trick) is not done: float32 scales cost 4 / block_size bytes per weight (1/16 byte at 64).

The blocked axis is counted from the end (`QuantSpec.axis` < 0), so slicing leading axes
(the scanned `layers` axis, kv_einsum's [k, v] axis) keeps the spec valid. Codes keep the
weight's logical axes (the packed 4-bit axis is halved), scales too (the blocked axis divided
by block_size), so both shard with the weight's rules. Pure jnp: nothing here knows the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "int4", "nf4")
# QLoRA's NF4 levels (bitsandbytes' table): quantiles of N(0, 1) scaled to [-1, 1], 0 exact.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
_QMAX = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}
# Prefer blocking along an axis that the rule table leaves whole or splits coarsely: never the
# fsdp-sharded `embed` axis (its per-device slices are too short to hold whole blocks).
_BLOCK_AXIS_PREFERENCE = ("head_dim", "mlp")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one weight is stored: mode, block size and the blocked axis (negative)."""

  mode: str
  block_size: int
  axis: int

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"quantization mode {self.mode!r}; choose one of {MODES}")
    if self.block_size < 2 or self.block_size % 2:
      raise ValueError(f"quantization block_size={self.block_size} must be an even int >= 2")
    if self.axis >= 0:
      raise ValueError(f"QuantSpec.axis={self.axis} must be negative (counted from the end)")

  @property
  def packed(self) -> bool:
    return self.mode in ("int4", "nf4")


def block_axis(axes: tuple[str | None, ...]) -> int:
  """The (negative) axis to block along for a weight with these logical axis names."""
  for name in _BLOCK_AXIS_PREFERENCE:
    if name in axes:
      return axes.index(name) - len(axes)
  return -1


def check_blockable(shape: tuple[int, ...], spec: QuantSpec, what: str) -> None:
  n = shape[spec.axis]
  if n % spec.block_size:
    raise ValueError(f"{what}: axis {spec.axis} of shape {shape} has {n} elements, not a "
                     f"multiple of block_size={spec.block_size} (lora.block_size)")


def quantize(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """(codes, scales) of w; codes int8 (int8) or uint8 holding two 4-bit codes."""
  check_blockable(w.shape, spec, "quantize")
  x = jnp.moveaxis(w.astype(jnp.float32), spec.axis, -1)
  n = x.shape[-1]
  blocks = x.reshape(*x.shape[:-1], n // spec.block_size, spec.block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  scale = absmax / _QMAX[spec.mode]
  y = blocks / jnp.where(scale > 0, scale, 1.0)[..., None]
  if spec.mode == "nf4":
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    q = jnp.searchsorted(midpoints, y, side="left").astype(jnp.uint8)
  else:
    q = jnp.clip(jnp.round(y), -_QMAX[spec.mode], _QMAX[spec.mode])
    q = (q + 8).astype(jnp.uint8) if spec.mode == "int4" else q.astype(jnp.int8)
  q = q.reshape(*x.shape[:-1], n)
  if spec.packed:
    q = q[..., 0::2] | (q[..., 1::2] << 4)
  return jnp.moveaxis(q, -1, spec.axis), jnp.moveaxis(scale, -1, spec.axis)


def dequantize(codes: jax.Array, scales: jax.Array, spec: QuantSpec, dtype=jnp.float32
               ) -> jax.Array:
  """The weight back from (codes, scales), computed in float32 and cast to dtype."""
  q = jnp.moveaxis(codes, spec.axis, -1)
  if spec.packed:
    q = jnp.stack([q & 15, q >> 4], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])
  if spec.mode == "nf4":
    values = jnp.asarray(NF4_LEVELS)[q.astype(jnp.int32)]
  elif spec.mode == "int4":
    values = q.astype(jnp.float32) - 8.0
  else:
    values = q.astype(jnp.float32)
  n = values.shape[-1]
  blocks = values.reshape(*values.shape[:-1], n // spec.block_size, spec.block_size)
  w = blocks * jnp.moveaxis(scales, spec.axis, -1)[..., None]
  return jnp.moveaxis(w.reshape(values.shape), -1, spec.axis).astype(dtype)


def quantized_shapes(shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple, tuple]:
  """(codes shape, scales shape) of a weight of `shape`."""
  axis = len(shape) + spec.axis
  codes, scales = list(shape), list(shape)
  if spec.packed:
    codes[axis] //= 2
  scales[axis] //= spec.block_size
  return tuple(codes), tuple(scales)


def error_bound(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Per-element bound on |w - dequantize(quantize(w))| in exact arithmetic (float64 NumPy):
  half a quantization step of the element's block (NF4: half the gap between the two levels
  that bracket w / absmax)."""
  x = np.moveaxis(np.asarray(w, np.float64), spec.axis, -1)
  blocks = x.reshape(*x.shape[:-1], -1, spec.block_size)
  absmax = np.max(np.abs(blocks), axis=-1, keepdims=True)
  if spec.mode == "nf4":
    levels = NF4_LEVELS.astype(np.float64)
    y = blocks / np.where(absmax > 0, absmax, 1.0)
    upper = np.clip(np.searchsorted(levels, y, side="left"), 1, len(levels) - 1)
    bound = (levels[upper] - levels[upper - 1]) / 2 * absmax
  else:
    bound = np.broadcast_to(absmax / _QMAX[spec.mode] / 2, blocks.shape)
  return np.moveaxis(bound.reshape(x.shape), -1, spec.axis)


def storage_bytes(shape: tuple[int, ...], spec: QuantSpec | None, dtype) -> int:
  """Bytes of a weight stored plain (spec None) or quantized (codes + float32 scales)."""
  if spec is None:
    return int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  codes, scales = quantized_shapes(shape, spec)
  return int(np.prod(codes)) + 4 * int(np.prod(scales))
