"""Block quantization (gemma_jax.quant) against an independent float64 NumPy reference, and
quantized models (gemma_jax.lora.quantize): error bounds, storage, logits, sampling."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import lora, quant
from gemma_jax.config import get_config
from gemma_jax.model import init_model
from gemma_jax.sampler import Sampler, SamplingParams
from model_utils import greedy_reference

# QLoRA's NF4 levels, typed in from the paper's appendix / bitsandbytes (not read from quant).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def reference(w: np.ndarray, mode: str, block: int, axis: int):
  """(dequantized weights, per-element half-step bound) in float64, blocks along `axis`."""
  x = np.moveaxis(w.astype(np.float64), axis, -1)
  b = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
  absmax = np.abs(b).max(-1, keepdims=True)
  safe = np.where(absmax > 0, absmax, 1.0)
  if mode == "nf4":
    y = b / safe
    idx = np.abs(y[..., None] - NF4).argmin(-1)
    deq = NF4[idx] * absmax
    gaps = np.diff(NF4)
    # half the gap of the interval that holds y
    interval = np.clip(np.searchsorted(NF4, y) - 1, 0, 14)
    bound = gaps[interval] / 2 * absmax
  else:
    qmax = {"int8": 127, "int4": 7}[mode]
    step = absmax / qmax
    deq = np.clip(np.round(b / np.where(step > 0, step, 1.0)), -qmax, qmax) * step
    bound = np.broadcast_to(step / 2, b.shape)
  back = lambda a: np.moveaxis(a.reshape(x.shape), -1, axis)
  return back(deq), back(bound)


def weights(shape, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32) * 0.02
  w.reshape(-1)[::97] *= 40  # outliers set some blocks' scale
  w[0, 0] = 0.0  # an all-zero block (axis -1, blocks of <= shape[-1])
  return w


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_roundtrip_within_bound_and_matches_reference(mode, axis):
  block = 32
  w = weights((3, 64, 64))
  spec = quant.QuantSpec(mode, block, axis)
  codes, scales = quant.quantize(jnp.asarray(w), spec)
  expect_codes, expect_scales = quant.quantized_shapes(w.shape, spec)
  assert codes.shape == expect_codes and scales.shape == expect_scales
  assert codes.dtype == (jnp.int8 if mode == "int8" else jnp.uint8)
  got = np.asarray(quant.dequantize(codes, scales, spec), np.float64)
  ref, bound = reference(w, mode, block, axis)
  err = np.abs(got - w)
  # The scheme's bound (half a step; NF4: half the gap around the value), float32 slack only.
  assert np.all(err <= bound * (1 + 1e-5) + 1e-9), float((err - bound).max())
  # Same codes as the float64 reference except at exact rounding ties (float32 vs float64).
  mismatch = ~np.isclose(got, ref, rtol=1e-6, atol=1e-9)
  assert mismatch.mean() < 1e-3, mismatch.mean()
  assert np.all(np.abs(got[mismatch] - ref[mismatch]) <= 2 * bound[mismatch] * (1 + 1e-5))
  # The all-zero block comes back exactly zero; the error is not trivially zero elsewhere.
  if axis == -1:
    assert np.all(got[0, 0] == 0)
  assert err.max() > 0
  # error_bound agrees with the reference bound
  np.testing.assert_allclose(quant.error_bound(w, spec), bound, rtol=1e-6, atol=1e-12)


def test_bounds_are_tight_enough_to_catch_a_wrong_scale():
  # A dequantizer with the int4 step off by one level (absmax / 8) breaks the bound.
  w = weights((2, 64, 64), seed=1)
  spec = quant.QuantSpec("int4", 64, -1)
  codes, scales = quant.quantize(jnp.asarray(w), spec)
  wrong = np.asarray(quant.dequantize(codes, scales * 7 / 8, spec), np.float64)
  _, bound = reference(w, "int4", 64, -1)
  assert np.any(np.abs(wrong - w) > bound)


def test_storage_bytes():
  shape = (4, 256, 512)
  spec = quant.QuantSpec("nf4", 64, -1)
  assert quant.storage_bytes(shape, spec, jnp.float32) == 4 * 256 * 512 // 2 + 4 * 4 * 256 * 8
  assert quant.storage_bytes(shape, None, jnp.bfloat16) == 4 * 256 * 512 * 2


def test_bad_block_size_names_the_key():
  with pytest.raises(ValueError, match="block_size"):
    quant.quantize(jnp.ones((4, 48)), quant.QuantSpec("int8", 32, -1))


# Relative RMS change of the logits of a random 7-layer model: about 3x the per-weight error
# (int8 blocks of 16: ~0.4%, nf4: ~8%); measured 1.2% and 27%.
@pytest.mark.parametrize("mode,tol", [("int8", 0.03), ("nf4", 0.4)])
def test_quantized_model_logits_memory_and_sampler(mode, tol):
  cfg = get_config("tiny_gemma3", dtype="float32")
  model = init_model(cfg, 0)
  tokens = jnp.array([[2, 17, 99, 4, 51, 23, 8, 9]])
  base = np.asarray(_logits(model, tokens))
  plain_bytes = lora.state_bytes(model)
  lora.quantize(model, mode, 16)
  got = np.asarray(_logits(model, tokens))
  rel = np.linalg.norm(got - base) / np.linalg.norm(base)  # relative RMS error
  assert 0 < rel < tol, rel
  # Only matmul weights change storage: 4x (int8) or ~8x (nf4) smaller for those.
  frozen = nnx.state(model, nnx.Param).to_pure_dict()
  q = frozen["layers"]["attn"]["q_einsum"]
  assert q["w"].dtype == (jnp.int8 if mode == "int8" else jnp.uint8)
  assert lora.state_bytes(model) < plain_bytes
  # The sampler runs on the quantized model (greedy: equal to argmax of the full forward).
  out = Sampler(model).generate([[2, 17, 99]], SamplingParams(max_new_tokens=4))[0]
  assert out.tokens == greedy_reference(model, [2, 17, 99], len(out.tokens))
