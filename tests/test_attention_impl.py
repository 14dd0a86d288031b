"""The fused attention implementations against the xla path and float64: the splash kernel in
Pallas interpret mode (on CPU), forward and gradients, kernel-level and inside the model on an
8-device mesh; the cuDNN path's mapping of Gemma's options (through jax's own xla version of
the same call); the config errors for what a backend or shape cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from configs.base import ConfigError
from gemma_jax import sharding
from gemma_jax.config import get_config
from gemma_jax.model import attention_impl
from gemma_jax.model.attention import NO_WINDOW, attention_mask, causal_attention
from tests.model_utils import random_model, random_tokens

T, B, N, H = 256, 2, 4, 16
RNG = np.random.default_rng(0)


def rows():
  """Row 0: two packed documents (positions restart at 100); row 1: one, right-padded."""
  segments = np.ones((B, T), np.int32)
  segments[0, 100:] = 2
  segments[1, 200:] = 0
  positions = np.stack([np.concatenate([np.arange(100), np.arange(T - 100)]), np.arange(T)])
  return positions, segments


def np_attention(q, k, v, positions, segments, window, cap):
  """float64 attention with the mask built from positions and segments (padding unread)."""
  q, k, v = (np.float64(a) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k)
  if cap is not None:
    logits = cap * np.tanh(logits / cap)
  qp, kp = positions[:, :, None], positions[:, None, :]
  visible = ((segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
             & (kp <= qp) & (qp - kp < window))[:, None]
  logits = np.where(visible, logits, -np.inf)
  w = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", np.nan_to_num(w / w.sum(-1, keepdims=True)), v)


def xla(q, k, v, positions, segments, window, cap):
  mask = attention_mask(positions, segments, positions, segments, window or NO_WINDOW)
  return causal_attention(q, k, v, mask, cap)


def splash(q, k, v, segments, window, cap):
  return attention_impl.self_attention("splash", q, k, v, segments, window=window, softcap=cap,
                                       interpret=True)


CASES = [  # kv heads, window, soft-cap, dtype
    (4, None, None, "float32"), (2, 20, 50.0, "float32"), (1, 20, None, "float32"),
    (1, None, 5.0, "bfloat16"), (2, 20, None, "bfloat16"),
]


@pytest.mark.parametrize("kv_heads,window,cap,dtype", CASES)
def test_splash_matches_xla_and_float64(kv_heads, window, cap, dtype):
  positions, segments = rows()
  q = RNG.normal(size=(B, T, N, H)) * 0.5
  k, v = RNG.normal(size=(2, B, T, kv_heads, H))
  q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
  valid = (segments != 0)[:, :, None, None]
  want = np_attention(q, k, v, positions, segments, window or NO_WINDOW, cap)
  got = np.float64(jax.jit(splash, static_argnums=(4, 5))(q, k, v, segments, window, cap))
  ref = np.float64(xla(q, k, v, positions, segments, window, cap))
  tol = 2e-6 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=tol)
  assert np.max(np.abs(np.where(valid, ref - want, 0))) < tol
  if window:  # the tolerance would catch a window one token too wide
    wider = np_attention(q, k, v, positions, segments, window + 1, cap)
    assert np.max(np.abs(np.where(valid, wider - want, 0))) > 5 * tol

  probe = jnp.asarray(RNG.normal(size=q.shape) * valid, jnp.float32)
  grads = lambda attend: jax.jit(jax.grad(
      lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * probe),
      argnums=(0, 1, 2)))(q, k, v)
  got = grads(lambda q, k, v: splash(q, k, v, segments, window, cap))
  with jax.enable_x64():
    want = jax.grad(lambda q, k, v: jnp.sum(xla(q, k, v, positions, segments, window, cap)
                                            * np.float64(probe)), argnums=(0, 1, 2))(
        *(np.float64(a) for a in (q, k, v)))
  for g, w in zip(got, want):
    scale = np.max(np.abs(w))
    np.testing.assert_allclose(np.float64(g) / scale, np.asarray(w) / scale,
                               atol=1e-5 if dtype == "float32" else 3e-2)


def loss_and_grads(model, tokens, positions, segments):

  def loss(model):
    logits = model(tokens, positions, segments)
    return jnp.sum(jnp.where(segments[..., None] != 0, jax.nn.log_softmax(logits), 0)[..., 7])

  return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize("name,tensor", [("tiny_gemma2", 2), ("tiny_gemma3", 4),
                                         ("tiny_gemma1", 2)])
def test_model_with_splash_matches_xla_on_a_mesh(name, tensor):
  """Every layer kind (tiny_gemma3: one period of 5 local + 1 global, then a local layer past
  the last whole period) with the kernel in shard_map: batch over fsdp, heads over tensor
  (tensor=4 splits tiny_gemma3's 4 query heads but not its 2 kv heads)."""
  positions, segments = (np.tile(a, (2, 1)) for a in rows())  # 4 rows: fsdp splits them
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=tensor))
  results = []
  for impl in ("xla", "splash"):
    cfg, model = random_model(name, sliding_window=40, attention_impl=impl,
                              attention_interpret=True)
    with jax.set_mesh(mesh):
      tokens = jax.device_put(random_tokens(cfg, segments.shape), sharding.batch_sharding(mesh))
      results.append(loss_and_grads(model, tokens, positions, segments))
  (loss_x, grads_x), (loss_s, grads_s) = results
  assert float(loss_s) == pytest.approx(float(loss_x), rel=1e-5)
  for (path, gx), gs in zip(jax.tree_util.tree_leaves_with_path(grads_x),
                           jax.tree.leaves(grads_s)):
    scale = float(jnp.max(jnp.abs(gx)))
    np.testing.assert_allclose(np.asarray(gs) / scale, np.asarray(gx) / scale, atol=3e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kv_heads,window", [(2, 20), (1, None)])
def test_cudnn_call_maps_gemma_options(kv_heads, window):
  """The cuDNN path's arguments (mask from segment ids, causal, left window, scale 1), run by
  jax's xla implementation of the same call, give the xla path's attention."""
  positions, segments = rows()
  q = jnp.asarray(RNG.normal(size=(B, T, N, H)), jnp.float32)
  k, v = jnp.asarray(RNG.normal(size=(2, B, T, kv_heads, H)), jnp.float32)
  got = attention_impl._cudnn(q, k, v, segments, window=window, softcap=None, interpret=False,
                              implementation="xla")
  want = xla(q, k, v, positions, segments, window, None)
  valid = (segments != 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-6)


def test_auto_and_fallbacks():
  g2, g3 = get_config("tiny_gemma2"), get_config("tiny_gemma3")
  assert attention_impl.resolve(g3, 256, "cpu") == "xla"
  assert attention_impl.resolve(g3, 256, "tpu") == "splash"
  assert attention_impl.resolve(g3, 200, "tpu") == "xla"  # does not tile: auto never fails
  assert attention_impl.resolve(g3, 256, "gpu") == "cudnn"
  assert attention_impl.resolve(g2, 256, "gpu") == "xla"  # soft-cap: cuDNN has none
  assert attention_impl.resolve(g2.replace(attention_impl="cudnn"), 256, "gpu") == "xla"


@pytest.mark.parametrize("overrides,seq_len,words", [
    (dict(attention_impl="splash"), 256, ["attention_impl='splash'", "TPU", "interpret"]),
    (dict(attention_impl="splash", attention_interpret=True), 200,
     ["multiple of 128", "256"]),
    (dict(attention_impl="cudnn"), 256, ["attention_impl='cudnn'", "NVIDIA GPU"]),
])
def test_config_errors_name_the_key_and_the_fix(overrides, seq_len, words):
  config = base.get_config()
  config.model.update(overrides)
  config.train.seq_len = seq_len
  with pytest.raises(ConfigError) as err:
    base.validate(config, 8)
  message = str(err.value)
  assert "\n" not in message and all(w in message for w in words), message
  # The model raises the same message (not a Mosaic traceback) if it is traced anyway.
  cfg = get_config("tiny_gemma3", **overrides)
  with pytest.raises(ValueError, match="attention_impl"):
    attention_impl.resolve(cfg, seq_len)


def test_unknown_impl_is_a_config_error():
  config = base.get_config()
  config.model.attention_impl = "flash"
  with pytest.raises(ConfigError, match="attention_impl='flash'"):
    base.validate(config, 8)
