"""The collective audit of compiled steps (launch.audit over launch.hlo): every trainer's train
step and the sampler's decode step, on 8 CPU devices and compiled for a TPU topology, move
about what ZeRO-3 predicts and never a [tokens, vocab] tensor; the old loss, which all-reduced
its partial logits, fails the same check."""

import functools
import importlib.util

import jax
import numpy as np
import pytest

from configs import dpo_tiny, grpo_tiny, reward_tiny, rlhf_tiny, sft_tiny, tiny
from gemma_jax import sharding
from gemma_jax.losses import chunked_cross_entropy
from gemma_jax.train_step import jit_train_step
from launch import audit, hlo
from launch import compile_step as aot
from trainers import rlhf

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed: no TPU topology")


def pretrain(**mesh):
  c = tiny.get_config()
  c.train.seq_len = 64
  c.mesh.update(**mesh)
  return c


def sft_lora():
  c = sft_tiny.get_config()  # LoRA rank 8 on every target
  c.train.seq_len = 64
  return c


CASES = {  # name: (config, task, decode)
    "pretrain": (pretrain, "pretrain", False),
    "pretrain data x fsdp x tensor": (functools.partial(pretrain, data=2, fsdp=2, tensor=2),
                                      "pretrain", False),
    "sft with LoRA": (sft_lora, "sft", False),
    "reward": (reward_tiny.get_config, "reward", False),
    "rlhf": (rlhf_tiny.get_config, "rlhf", False),
    "grpo": (grpo_tiny.get_config, "rlhf", False),
    "dpo": (dpo_tiny.get_config, "dpo", False),
    "decode": (pretrain, "pretrain", True),
}


def compiled_audit(devices, make_config, task, decode):
  config = make_config()
  if decode:
    compiled, layout, _ = aot.compile_decode_step(config, devices)
  else:
    compiled, layout, _ = aot.compile_train_step(config, devices, task)
  return hlo.audit(compiled.as_text()), layout


def assert_zero3(a: hlo.Audit, layout, decode: bool):
  result = audit.check(a, layout, decode=decode)
  assert not result["logits_collectives"], result
  assert 1 / audit.FACTOR <= result["ratio"] <= audit.FACTOR, result
  assert result["ok"]


@pytest.mark.parametrize("name", CASES)
def test_steps_on_8_cpu_devices_move_what_zero3_predicts(name):
  make_config, task, decode = CASES[name]
  assert_zero3(*compiled_audit(jax.devices(), make_config, task, decode), decode)


@needs_libtpu
@pytest.mark.parametrize("name", ["pretrain", "sft with LoRA", "reward", "rlhf", "grpo", "dpo",
                                  "decode"])
def test_steps_compiled_for_a_tpu_topology_move_what_zero3_predicts(name):
  make_config, task, decode = CASES[name]
  assert_zero3(*compiled_audit(aot.topology_devices("v5e:2x4"), make_config, task, decode),
               decode)


def test_rlhf_scoring_moves_no_logits():
  """The teacher-forced log-probs of the policy and the reference (RLHF's rollout scoring)."""
  config = rlhf_tiny.get_config()
  layout = aot.build_layout(config, jax.devices(), "rlhf")
  rows = jax.ShapeDtypeStruct((32, 40), np.int32, sharding=sharding.batch_sharding(layout.mesh))
  params = layout.abstract.model_params()
  score = jax.jit(functools.partial(rlhf._teacher_forced, layout.graphdef, chunk_size=4096))
  with jax.set_mesh(layout.mesh):
    text = score.lower(params, params, rows, rows, rows, rows).compile().as_text()
  a = hlo.audit(text)
  assert not audit.logits_collectives(a, layout)
  assert a.totals()["all-gather"].traffic_bytes > 0  # the weights are gathered, as ZeRO-3 does


def test_the_old_loss_fails_the_check():
  """Negative control: the plain chunked loss under jit (the loss before its shard_map) on an
  fsdp mesh contracts over the table's sharded embed dimension and all-reduces its logits."""
  config = pretrain()
  layout = aot.build_layout(config, jax.devices())

  def old_lm_loss(model, batch, rng):
    features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"])
    return chunked_cross_entropy(features, model.embedder.input_embedding[...],
                                 batch["targets"], batch["loss_weights"], chunk_size=128)

  shape = (config.train.global_batch_size, config.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_weights" else np.int32,
                                   sharding=sharding.batch_sharding(layout.mesh))
           for k in ("tokens", "positions", "segment_ids", "targets", "loss_weights")}
  step = jit_train_step(layout, old_lm_loss, lambda s: 0.0)
  with jax.set_mesh(layout.mesh):
    text = step.lower(layout.abstract, batch).compile().as_text()
  result = audit.check(hlo.audit(text), layout)
  assert result["logits_collectives"] and not result["ok"], result
