"""Model behaviour beyond parity: remat, dtypes, jit through split/merge, param axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax.config import REMAT_POLICIES
from gemma_jax.model import init_cache, param_axes
from model_utils import random_model, random_tokens


def loss_and_grads(model, tokens):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state):
    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
          logits, tokens[..., None], -1)[..., 0])
    return jax.value_and_grad(loss)(state)
  return f(state)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_keep_loss_and_grads(policy):
  _, base = random_model("tiny_gemma2")
  _, remat = random_model("tiny_gemma2", remat_policy=policy)
  tokens = jnp.asarray(random_tokens(base.config, (2, 16)))
  (l0, g0), (l1, g1) = loss_and_grads(base, tokens), loss_and_grads(remat, tokens)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_layer_loop_matches_scan():
  """scan_layers=False: the same loss, gradients and cached decoding as the scanned layers."""
  # Local layers (window 8) and a global one with other RoPE settings.
  cfg, scanned = random_model("tiny_gemma3")
  looped = nnx.merge(*nnx.split(scanned))  # the same weights
  looped.config = cfg.replace(scan_layers=False)
  tokens = jnp.asarray(random_tokens(scanned.config, (2, 16)))
  (l0, g0), (l1, g1) = loss_and_grads(scanned, tokens), loss_and_grads(looped, tokens)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)

  @nnx.jit
  def prefill_and_step(model):
    ones = jnp.ones((2, 12), jnp.int32)
    prefill, cache = model(tokens[:, :12], jnp.cumsum(ones, 1) - 1, ones,
                           init_cache(model.config, 2, 16))
    step, _ = model(tokens[:, 12:13], jnp.full((2, 1), 12), ones[:, :1], cache)
    return prefill, step
  for a, b in zip(prefill_and_step(scanned), prefill_and_step(looped)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_every_parameter_gets_a_gradient():
  _, model = random_model("tiny_gemma3")
  _, grads = loss_and_grads(model, jnp.asarray(random_tokens(model.config, (2, 16))))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_bfloat16_compute_tracks_float32():
  cfg, model = random_model("tiny_gemma3")
  tokens = jnp.asarray(random_tokens(cfg, (2, 16)))
  want = np.asarray(model(tokens))
  model.config = cfg.replace(dtype="bfloat16")
  got = model(tokens)
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert 1e-5 < err < 3e-2  # really ran in bf16, and still close


def test_params_keep_param_dtype_and_have_axes():
  cfg, model = random_model("tiny_gemma3", param_dtype="bfloat16")
  state = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype("bfloat16")}
  axes = param_axes(state).to_pure_dict()
  assert axes["embedder"]["input_embedding"] == ("vocab", "embed")
  assert axes["layers"]["attn"]["q_einsum"]["w"] == ("layers", "heads", "embed", "head_dim")
  assert axes["layers"]["mlp"]["gating_einsum"] == ("layers", None, "embed", "mlp")
  shapes = jax.tree.map(lambda x: x.shape, state.to_pure_dict())
  assert shapes["layers"]["attn"]["kv_einsum"]["w"] == (cfg.num_layers, 2, 2, 64, 16)


def test_sharded_forward_matches_single_device():
  """Weights sharded over 8 devices (embed axis) give the same logits as one device."""
  cfg, model = random_model("tiny_gemma1")
  tokens = jnp.asarray(random_tokens(cfg, (8, 12)))
  want = np.asarray(model(tokens))
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  graphdef, state = nnx.split(model)
  spec = lambda v: jax.sharding.PartitionSpec(*("fsdp" if a == "embed" else None for a in v.axes))
  shardings = jax.tree.map(lambda v: jax.sharding.NamedSharding(mesh, spec(v)), state,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  state = jax.device_put(state, shardings)
  got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  # Only the summation order of sharded contractions differs.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
