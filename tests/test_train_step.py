"""ZeRO-3 train step: sharded == single device, per-device memory, accumulation, NaN skip,
optimizer schedule and weight-decay mask, and a small AOT compile for a TPU topology."""

import importlib.util
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from gemma_jax import sharding
from gemma_jax.config import get_config
from gemma_jax.losses import lm_loss
from gemma_jax.model import abstract_model
from gemma_jax.optim import make_optimizer, weight_decay_mask
from gemma_jax.train_state import RunLayout
from gemma_jax.train_step import jit_train_step

CFG = get_config("tiny_gemma2", dtype="float32")


def optimizer_config(**kw):
  c = base.get_config().optimizer
  c.update({"learning_rate": 1e-2, "warmup_steps": 2, **kw})
  return c


def synthetic_batch(batch_size=8, seq_len=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CFG.vocab_size, size=(batch_size, seq_len + 1)).astype(np.int32)
  weights = (rng.random((batch_size, seq_len)) > 0.2).astype(np.float32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
          "segment_ids": np.ones((batch_size, seq_len), np.int32), "loss_weights": weights}


def run_steps(mesh_sizes, num_steps=2, microbatches=1, devices=None, batch=None):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_sizes)), devices)
  optimizer, schedule = make_optimizer(optimizer_config(), total_steps=10)
  loss_fn = lambda model, b, rng: lm_loss(model, b, rng, chunk_size=40)
  layout = RunLayout.build(CFG, optimizer, mesh)
  with jax.set_mesh(mesh):
    state = layout.init(seed=0)
    initial_params = jax.device_get(state.params)  # before donation frees the buffers
    jitted = jit_train_step(layout, loss_fn, schedule, microbatches=microbatches)
    losses = []
    for i in range(num_steps):
      state, metrics = jitted(state, batch if batch is not None else synthetic_batch(seed=i))
      losses.append(metrics)
  return initial_params, state, jax.device_get(losses)


ONE_DEVICE = dict(mesh_sizes=(1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def single_device():
  return run_steps(**ONE_DEVICE)[1:]


@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(single_device, mesh_sizes):
  want_state, want_metrics = single_device
  _, state, metrics = run_steps(mesh_sizes)
  for got, want in zip(metrics, want_metrics):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=2e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5),
               jax.device_get(state.params), jax.device_get(want_state.params))
  assert want_metrics[1]["loss"] < want_metrics[0]["loss"] + 1.0  # sanity: a real update ran


def _bytes_per_device(state, n):
  per_device = [0] * n
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    for shard in leaf.addressable_shards:
      per_device[jax.devices().index(shard.device)] += shard.data.nbytes
  return per_device


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_param_and_optimizer_bytes_shrink_with_fsdp(n):
  optimizer, _ = make_optimizer(optimizer_config(), total_steps=10)
  cfg = get_config("tiny_gemma2", embed_dim=128, hidden_dim=256)
  abstract = RunLayout.build(cfg, optimizer, sharding.make_mesh(
      dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])).abstract
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      (abstract.params, abstract.opt_state)))
  mesh = sharding.make_mesh(dict(data=1, fsdp=n, tensor=1), jax.devices()[:n])
  state = RunLayout.build(cfg, optimizer, mesh).init(seed=0)
  per_device = _bytes_per_device(state, n)
  assert sum(per_device) >= total  # every byte is somewhere
  assert max(per_device) <= 1.05 * total / n, (n, per_device, total)


def test_gradient_accumulation_equals_one_big_batch():
  batch = synthetic_batch(seed=7)
  _, _, big = run_steps(**ONE_DEVICE, num_steps=1, batch=batch)
  _, _, acc = run_steps(**ONE_DEVICE, num_steps=1, microbatches=4, batch=batch)
  np.testing.assert_allclose(acc[0]["loss"], big[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(acc[0]["grad_norm"], big[0]["grad_norm"], rtol=1e-4)
  assert acc[0]["tokens"] == batch["loss_weights"].sum()


def test_non_finite_loss_skips_the_update():
  batch = synthetic_batch()
  batch["loss_weights"] = batch["loss_weights"].copy()
  batch["loss_weights"][0, 0] = np.nan
  initial, state, metrics = run_steps(**ONE_DEVICE, num_steps=1, batch=batch)
  assert bool(metrics[0]["skipped"]) and not np.isfinite(metrics[0]["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), initial)
  assert int(state.step) == 1


def test_schedule_and_decay_mask():
  opt = optimizer_config(schedule="cosine", warmup_steps=10, end_lr_fraction=0.1)
  _, schedule = make_optimizer(opt, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.005)
  assert float(schedule(10)) == pytest.approx(0.01)
  assert float(schedule(60)) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5), rel=1e-4)
  assert float(schedule(110)) == pytest.approx(0.001, rel=1e-4)
  _, linear = make_optimizer(optimizer_config(schedule="linear", warmup_steps=0,
                                              end_lr_fraction=0.0), total_steps=100)
  assert float(linear(50)) == pytest.approx(0.005)
  params = nnx.split(abstract_model(CFG))[1].to_pure_dict()
  mask = weight_decay_mask(params, decay_embedding=False, decay_norms=False)
  assert mask["embedder"]["input_embedding"] is False
  assert mask["layers"]["pre_attention_norm"]["scale"] is False
  assert mask["layers"]["mlp"]["linear"] is True
  with pytest.raises(ValueError, match="optimizer.schedule='exp'"):
    make_optimizer(optimizer_config(schedule="exp"), total_steps=10)


def test_optimizer_moments_share_param_shardings():
  optimizer, _ = make_optimizer(optimizer_config(), total_steps=10)
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  shardings = RunLayout.build(CFG, optimizer, mesh).shardings
  mu = shardings.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert mu["layers"]["mlp"]["linear"] == shardings.params["layers"]["mlp"]["linear"]
  assert shardings.params["layers"]["mlp"]["linear"].spec == jax.sharding.PartitionSpec(
      None, None, "fsdp")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'jax[tpu]'): no TPU topology")
def test_aot_compile_for_tpu_topology(capsys):
  from launch import compile_step as aot

  config = ml_collections.ConfigDict(base.get_config())
  config.model.preset = "tiny_gemma3"
  config.train.update(global_batch_size=8, seq_len=64)
  result = aot.report(config, "v5e:2x2")
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert result["device_kind"] == "TPU v5 lite"
  assert 0 < result["per_chip_bytes"]["peak"] < 2**30
  assert result["per_chip_bytes"]["argument"] > 0 and result["hlo_flops_per_chip"] > 0
  assert result["zero3"]["ok"] and result["step_seconds_estimate"]["total"] > 0
  json.dumps(result)
