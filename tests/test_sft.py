"""SFT: the chat loss touches only model turns, and `python -m trainers.sft` end to end on the
tiny chat set with QLoRA (adapter-only checkpoints, eval, samples, resume, merge, HF export)."""

import ast
import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, sft_tiny
from gemma_jax import lora, sharding
from gemma_jax.config import get_config
from gemma_jax.convert import import_checkpoint
from gemma_jax.convert.__main__ import main as convert_main
from gemma_jax.data import default_config, make_iterator
from gemma_jax.lora import __main__ as lora_cli
from gemma_jax.losses import chunked_cross_entropy
from gemma_jax.model import init_model
from gemma_jax.model_dir import load_lora_run, load_model_dir
from trainers import cli, sft


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _model_turn_targets(tokens, segments, tok) -> np.ndarray:
  """[B, T] True where the next token of the same segment lies in a model turn's content or
  is the <end_of_turn> closing it, found by scanning the ids (not the pipeline's weights)."""
  header = tok.encode("<start_of_turn>model\n")
  expect = np.zeros(tokens.shape, bool)
  for r in range(tokens.shape[0]):
    row, segs = list(tokens[r]), segments[r]
    in_model = np.zeros(len(row), bool)
    i = 0
    while i < len(row):
      if row[i:i + len(header)] == header:
        j = i + len(header)
        while j < len(row) and row[j] != tok.end_of_turn_id:
          in_model[j] = True
          j += 1
        if j < len(row):
          in_model[j] = True
        i = j + 1
      else:
        i += 1
    same = (segs[1:] == segs[:-1]) & (segs[1:] != 0)
    expect[r, :-1] = in_model[1:] & same
  return expect


def test_gradient_wrt_user_turn_logits_is_exactly_zero(tok):
  data = default_config()
  train, _ = sft_tiny.split_chats()
  data.update(sources=[{"records": train[:40]}], format="chat", packing="first_fit",
              seq_len=256, batch_size=4, shuffle=False)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  batch = jax.device_get(next(make_iterator(data, tok, mesh)))
  expect = _model_turn_targets(batch["tokens"], batch["segment_ids"], tok)
  assert 0 < expect.sum() < (batch["segment_ids"] > 0).sum() * 0.8  # user turns exist
  cfg = get_config("tiny_gemma3", dtype="float32", vocab_size=1024)
  model = init_model(cfg, 0)
  features = jax.jit(lambda t, p, s: model.features(t, p, s))(
      batch["tokens"], batch["positions"], batch["segment_ids"])
  table = model.embedder.input_embedding[...]
  features_grad = jax.grad(lambda f: chunked_cross_entropy(
      f, table, batch["targets"], batch["loss_weights"], chunk_size=256)[0])(features)
  logits = model.logits(features)  # the same per-position logits, taken as the variable
  logits_grad = jax.grad(lambda z: jnp.sum(batch["loss_weights"] * (
      jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, batch["targets"][..., None], -1)[..., 0])))(
          logits)
  for grad in (np.asarray(features_grad), np.asarray(logits_grad)):
    zero = np.all(grad == 0, axis=-1)
    assert np.array_equal(zero, ~expect)  # exactly zero off model turns, nonzero on them


def _run(workdir, *overrides) -> int:
  return cli.main(sft.TASK, [
      "sft", "--config", "configs/sft_tiny.py", "--workdir", str(workdir),
      "--config.train.seq_len=128", "--config.lora.rank=2", "--config.lora.quantize=nf4",
      "--config.lora.block_size=16", "--config.eval.every=12", "--config.eval.batches=1",
      "--config.samples.every=24", "--config.samples.max_new_tokens=6",
      "--config.checkpoint.every=12", "--config.logging.every=4",
      "--config.logging.tensorboard=False", "--config.optimizer.warmup_steps=2", *overrides])


def _saved_leaves(item_dir: Path) -> set[tuple[str, ...]]:
  """The tree paths an orbax item holds, from its metadata (file sizes vary with OCDBT)."""
  return {ast.literal_eval(key) for key in json.loads((item_dir / "_METADATA").read_text())[
      "tree_metadata"]}


def test_qlora_sft_end_to_end_resume_merge_and_export(tmp_path):
  wd = tmp_path / "run"
  assert _run(wd, "--config.train.steps=24") == 0
  metrics = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  losses = [m["loss"] for m in metrics if "loss" in m]
  assert losses[-1] < losses[0] - 0.5, losses  # QLoRA trains on the chat set
  assert [m["step"] for m in metrics if "eval_loss" in m] == [12, 24]
  samples = [json.loads(line) for line in (wd / "samples.jsonl").read_text().splitlines()]
  assert [s["prompt"] for s in samples] == list(sft_tiny.get_config().samples.prompts)
  assert all(isinstance(s["completion"], str) for s in samples)
  # Adapter-only checkpoints: no base weights, a small fraction of the model's bytes.
  step_dir = wd / "checkpoints" / "24"
  assert not (step_dir / "frozen").exists()
  adapters_24 = load_model_dir(wd)[1]  # a LoRA workdir loads as base + adapters
  trainable = {tuple(str(k) for k in path) for path, _ in
               nnx.to_flat_state(nnx.state(adapters_24, lora.TRAINABLE))}
  assert trainable and _saved_leaves(step_dir / "params") == trainable

  # Resume: a longer run continues from step 24 with the saved adapters and rebuilt base.
  assert _run(wd, "--config.train.steps=28", "--config.eval.every=0",
              "--config.samples.every=0") == 0
  metrics = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  resumed = [m for m in metrics if m.get("step") == 28 and "loss" in m]
  assert resumed and resumed[0]["loss"] < losses[0] - 0.5
  _, restored, _ = load_lora_run(wd, step=24)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(restored, lora.TRAINABLE),
               nnx.state(adapters_24, lora.TRAINABLE))

  # Merge into the float base (rebuilt from the run's seed: no init_from) and export to HF.
  out = tmp_path / "merged"
  assert lora_cli.main(["merge", "--adapters", str(wd), "--out", str(out)]) == 0
  _, merged, tokenizer = load_model_dir(out)
  assert tokenizer is not None
  _, unmerged, _ = load_lora_run(wd, quantized=False)
  tokens = jnp.array([[2, 17, 99, 4, 51, 23, 8, 9]])
  expect = np.asarray(_logits(unmerged, tokens))
  got = np.asarray(_logits(merged, tokens))
  np.testing.assert_allclose(got, expect, atol=1e-5 * np.abs(expect).max())
  assert convert_main(["--from", "model", str(out), "--to-hf", str(tmp_path / "hf")]) == 0
  _, back = import_checkpoint("hf", tmp_path / "hf", tmp_path / "back")
  _, reloaded, _ = load_model_dir(back, dtype="float32")
  np.testing.assert_allclose(np.asarray(_logits(reloaded, tokens)), expect,
                             atol=1e-5 * np.abs(expect).max())


@pytest.mark.parametrize("name", ["sft_tiny", "sft_gemma_2b", "sft_gemma3_270m"])
def test_sft_configs_follow_the_schema(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  base._check_schema(config, base.get_config(), "config")
  assert config.data.format == "chat" and config.lora.rank > 0
  if name == "sft_tiny":
    assert base.validate(config, 8).name == "tiny_gemma3"


@pytest.mark.parametrize("key,value,message", [
    ("lora.rank", -1, "config.lora.rank=-1"),
    ("lora.alpha", 0.0, "config.lora.alpha=0.0"),
    ("lora.dropout", 1.0, "config.lora.dropout=1.0"),
    ("lora.targets", ("q_proj",), "config.lora.targets: unknown ['q_proj']"),
    ("lora.quantize", "fp4", "config.lora.quantize='fp4'"),
    ("lora.block_size", 7, "config.lora.block_size=7"),
    ("samples.prompts", (), "config.samples.every=30 needs config.samples.prompts"),
    ("samples.max_new_tokens", 0, "config.samples.max_new_tokens=0"),
])
def test_bad_lora_or_samples_config_names_the_key(key, value, message):
  config = sft_tiny.get_config()
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(base.ConfigError) as e:
    base.validate(config, 8)
  assert message in str(e.value)


def test_quantize_needs_adapters():
  config = sft_tiny.get_config()
  config.lora.update(rank=0, quantize="nf4")
  with pytest.raises(base.ConfigError, match="config.lora.quantize='nf4' needs config.lora.rank"):
    base.validate(config, 8)
