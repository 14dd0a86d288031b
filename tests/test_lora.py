"""LoRA adapters (gemma_jax.lora): exact no-op at B = 0, forward and merge against a NumPy
reference, a LoRA train step (only adapters change and hold optimizer state), shardings from
the rule table, dropout, and the sampler on an adapted model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemma_jax import lora, sharding
from gemma_jax.config import get_config
from gemma_jax.model import init_model
from gemma_jax.model.adapters import LoRA
from gemma_jax.sampler import Sampler, SamplingParams
from model_utils import greedy_reference
from gemma_jax.train_state import RunLayout
from gemma_jax.losses import lm_loss
from gemma_jax.train_step import make_train_step

TOKENS = jnp.array([[2, 17, 99, 4, 51, 23, 8, 9, 40, 41, 42, 43]])
# delta W = A B in each weight's own layout (l = layers, s = the [k, v] / [gate, up] stack),
# written out by hand rather than derived from the einsum equations as lora.py does.
REFERENCE = {
    ("attn", "q_einsum", "w"): "ldr,lrnh->lndh",
    ("attn", "kv_einsum", "w"): "lsdr,lsrkh->lskdh",
    ("attn", "attn_vec_einsum", "w"): "lnhr,lrd->lnhd",
    ("mlp", "gating_einsum"): "lsdr,lsrf->lsdf",
    ("mlp", "linear"): "lfr,lrd->lfd",
}


def _adapter(tree: dict, key: tuple) -> dict:
  node = tree["layers"][key[0]]
  return node[key[1]]["w_lora"] if len(key) == 3 else node[f"{key[1]}_lora"]


def _randomize_adapters(model, seed=1, scale=0.05):
  state = nnx.state(model, lora.TRAINABLE)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def _reference_merged(base: dict, adapters: dict, alpha: float, rank: int) -> dict:
  """The base pure dict with W + alpha / rank A B added in float64 NumPy."""
  out = jax.tree.map(np.asarray, base)
  for key, eq in REFERENCE.items():
    ab = _adapter(adapters, key)
    delta = np.einsum(eq, np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64))
    node = out["layers"][key[0]][key[1]]
    if len(key) == 3:
      node[key[2]] = (node[key[2]] + alpha / rank * delta).astype(np.float32)
    else:
      out["layers"][key[0]][key[1]] = (node + alpha / rank * delta).astype(np.float32)
  return out


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


@nnx.jit
def _dropout_logits(model, tokens, key):
  return model.logits(model.features(tokens, rng=key))


@pytest.mark.parametrize("name", ["tiny_gemma1", "tiny_gemma3"])
def test_zero_b_exact_then_forward_and_merge_match_numpy_reference(name):
  cfg = get_config(name, dtype="float32")
  model = init_model(cfg, 0)
  base_params = nnx.state(model, nnx.Param).to_pure_dict()
  base = np.asarray(_logits(model, TOKENS))
  lcfg = lora.LoRAConfig(rank=3, alpha=6.0, dropout=0.1)
  lora.apply(model, lcfg, seed=5)
  # B = 0: exactly the base logits, also with dropout active.
  assert np.array_equal(np.asarray(_logits(model, TOKENS)), base)
  assert np.array_equal(np.asarray(_dropout_logits(model, TOKENS, jax.random.key(3))), base)
  _randomize_adapters(model)
  adapters = nnx.state(model, lora.TRAINABLE).to_pure_dict()
  reference = init_model(cfg, 0)
  state = nnx.state(reference, nnx.Param)
  state.replace_by_pure_dict(_reference_merged(base_params, adapters, lcfg.alpha, lcfg.rank))
  nnx.update(reference, state)
  expect = np.asarray(_logits(reference, TOKENS))
  scale = np.abs(expect).max()
  assert np.abs(expect - base).max() > 1e-2 * scale  # the adapters matter
  np.testing.assert_allclose(np.asarray(_logits(model, TOKENS)), expect, atol=2e-5 * scale)
  merged = lora.merge(model)
  assert not jax.tree.leaves(nnx.state(merged, lora.TRAINABLE))
  np.testing.assert_allclose(np.asarray(_logits(merged, TOKENS)), expect, atol=2e-5 * scale)


def test_only_some_targets():
  cfg = get_config("tiny_gemma3", dtype="float32")
  model = lora.apply(init_model(cfg, 0), lora.LoRAConfig(rank=2, targets=("q_einsum", "linear")))
  adapters = nnx.state(model, lora.TRAINABLE).to_pure_dict()["layers"]
  assert set(adapters) == {"attn", "mlp"}
  assert set(adapters["attn"]) == {"q_einsum"} and set(adapters["mlp"]) == {"linear_lora"}
  with pytest.raises(ValueError, match="lora.targets"):
    lora.LoRAConfig(rank=2, targets=("q_proj",))


def _batch(cfg, rows=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (rows, length + 1)).astype(np.int32)
  weights = np.ones((rows, length), np.float32)
  weights[:, : length // 2] = 0  # a "prompt" half that is not trained on
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32),
          "segment_ids": np.ones((rows, length), np.int32), "loss_weights": weights}


def test_train_step_updates_only_adapters():
  # With an int8 base (QLoRA's path; a float base differs only in model/adapters.kernel).
  cfg = get_config("tiny_gemma3", dtype="float32")
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1, quantize="int8", block_size=16)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  optimizer = optax.adamw(1e-2)
  layout = RunLayout.build(cfg, optimizer, mesh, lora.recipe(lcfg))
  state, shardings = layout.init(seed=0), layout.shardings
  # Optimizer state: Adam's two moments of each adapter, and nothing of the base.
  adapter_sizes = sorted(x.size for x in jax.tree.leaves(state.params))
  moments = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == sorted(adapter_sizes * 2)
  frozen_before = jax.device_get(state.frozen)
  params_before = jax.device_get(state.params)
  step = jax.jit(make_train_step(layout, lm_loss, optax.constant_schedule(1e-2)),
                 in_shardings=(shardings, None), out_shardings=(shardings, None))
  losses = []
  with jax.set_mesh(mesh):
    for i in range(8):
      state, metrics = step(state, _batch(cfg, seed=i % 2))
      losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), frozen_before,
               state.frozen)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), params_before,
                         state.params)
  assert all(jax.tree.leaves(changed))
  # After training: the merged model's logits equal the adapted model's.
  model = layout.model(jax.device_get(state.model_params()))
  adapted = np.asarray(_logits(model, TOKENS))
  merged = np.asarray(_logits(lora.merge(model), TOKENS))
  np.testing.assert_allclose(merged, adapted, atol=1e-5 * np.abs(adapted).max())


def test_shardings_follow_the_rule_table():
  cfg = get_config("tiny_gemma3", dtype="float32")
  lcfg = lora.LoRAConfig(rank=4, quantize="nf4", block_size=16)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  s = RunLayout.build(cfg, optax.adam(1e-3), mesh, lora.recipe(lcfg)).shardings
  attn, mlp = s.params["layers"]["attn"], s.params["layers"]["mlp"]
  assert attn["q_einsum"]["w_lora"]["a"].spec == P(None, "fsdp", None)  # [L, D, r]
  assert attn["attn_vec_einsum"]["w_lora"]["b"].spec == P(None, None, "fsdp")  # [L, r, D]
  assert mlp["linear_lora"]["b"].spec == P(None, None, "fsdp")
  # Factors without an embed dimension are fsdp-sharded on another one (not replicated):
  # q's B [L, r, N=4, H=16] on head_dim (4 heads do not split 8 ways), gating's B
  # [L, 2, r, F] and linear's A [L, F, r] on the MLP width.
  assert attn["q_einsum"]["w_lora"]["b"].spec == P(None, None, None, "fsdp")
  assert mlp["gating_einsum_lora"]["b"].spec == P(None, None, None, "fsdp")
  assert mlp["linear_lora"]["a"].spec == P(None, "fsdp", None)
  frozen = s.frozen["layers"]["attn"]["q_einsum"]
  assert frozen["w"].spec == P(None, None, "fsdp", None)  # codes [L, N, D, H/2]
  assert frozen["w_scale"].spec == P(None, None, "fsdp", None)  # scales [L, N, D, H/16]
  # Adam moments take the adapters' shardings.
  mu = s.opt_state[0].mu["layers"]["attn"]["q_einsum"]["w_lora"]["a"]
  assert mu.spec == P(None, "fsdp", None)


def test_dropout_is_unbiased_and_off_in_eval_mode():
  d, f, rank, p = 8, 6, 3, 0.5
  adapter = LoRA("btd,df->btf", (d, f), ("embed", "mlp"), rank=rank, alpha=3.0, dropout=p,
                 rngs=nnx.Rngs(0))
  adapter.b[...] = jax.random.normal(jax.random.key(1), adapter.b[...].shape)
  x = jax.random.normal(jax.random.key(2), (1, 4, d))
  plain = adapter(x)
  keys = jax.random.split(jax.random.key(3), 4000)
  graphdef, state = nnx.split(adapter)
  runs = jax.vmap(lambda k: nnx.merge(graphdef, state)(x, k))(keys)
  assert not np.allclose(runs[0], plain)
  # E[dropout(x) / (1 - p)] = x; tolerance ~5 standard errors.
  stderr = np.asarray(runs.std(0)) / np.sqrt(len(keys))
  assert np.all(np.abs(np.asarray(runs.mean(0) - plain)) < 5 * stderr + 1e-6)
  adapter.eval()
  np.testing.assert_array_equal(adapter(x, keys[0]), plain)


def test_sampler_on_adapted_model_matches_merged_greedy():
  cfg = get_config("tiny_gemma3", dtype="float32")
  model = lora.apply(init_model(cfg, 0), lora.LoRAConfig(rank=3, alpha=6.0, dropout=0.1),
                     seed=5)
  _randomize_adapters(model, scale=0.2)
  out = Sampler(model).generate([[2, 17, 99]], SamplingParams(max_new_tokens=6))[0]
  assert out.tokens == greedy_reference(lora.merge(model), [2, 17, 99], len(out.tokens))
