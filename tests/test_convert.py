"""Conversion to and from HF safetensors and the official Flax layout, with tiny random models."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from gemma_jax.checkpoint import save_model_dir
from gemma_jax.model_dir import load_model_dir
from gemma_jax.config import get_config
from gemma_jax.convert import export_hf, import_checkpoint
from gemma_jax.convert.__main__ import main as convert_main
from gemma_jax.convert.configs import architecture
from gemma_jax.convert.official import to_official
from gemma_jax.model import abstract_model
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece
from hf_reference import hf_logits
from model_utils import random_tokens

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
FAMILIES = ["tiny_gemma1", "tiny_gemma2", "tiny_gemma3"]
forward = nnx.jit(lambda model, tokens: model(tokens))  # one compile for equal architectures


@functools.cache
def tiny(name: str, **overrides):
  """A tiny preset in float32 with every weight (norms too) drawn from N(0, 0.3^2).

  Like model_utils.random_model, but filled from numpy: no per-parameter compilation.
  """
  cfg = get_config(name, dtype="float32", **overrides)
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(len(name) + len(overrides))
  state.replace_by_pure_dict(jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape).astype(np.float32)),
      state.to_pure_dict()))
  return cfg, nnx.merge(graphdef, state)


def params_of(model) -> dict:
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def assert_same_params(a: dict, b: dict) -> None:
  flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(x)[0]) for x in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=jax.tree_util.keystr(key))


def assert_close(ours, ref, rel=1e-4):
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() <= rel * scale


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
  """(config, model, model dir, HF export dir) of a tiny random model."""
  cfg, model = tiny(request.param)
  tmp = tmp_path_factory.mktemp(request.param)
  save_model_dir(tmp / "model", cfg, model, tokenizer_model=b"spm")
  assert convert_main(["--from", "model", str(tmp / "model"), "--to-hf", str(tmp / "hf")]) == 0
  return cfg, model, tmp / "model", tmp / "hf"


def test_hf_round_trip_is_identity(exported, tmp_path):
  cfg, model, _, hf_dir = exported
  cfg2, out = import_checkpoint("hf", hf_dir, tmp_path / "back")
  assert cfg2.name == cfg.name and architecture(cfg2) == architecture(cfg)
  _, model2, tokenizer = load_model_dir(out)
  assert_same_params(params_of(model2), params_of(model))
  assert tokenizer.read_bytes() == b"spm"


def test_transformers_loads_export_with_our_logits(exported):
  cfg, model, _, hf_dir = exported
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
  assert type(hf).__name__ == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
  tokens = random_tokens(cfg, (2, 24))
  assert_close(np.asarray(forward(model, jnp.asarray(tokens))),
               hf_logits(hf.float().eval(), tokens))


def test_reads_transformers_own_save(exported, tmp_path):
  """config.json as transformers 5 writes it (rope_parameters, defaults left out)."""
  cfg, model, _, hf_dir = exported
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  hf.save_pretrained(tmp_path / "saved")
  cfg2, out = import_checkpoint("hf", tmp_path / "saved", tmp_path / "back")
  assert architecture(cfg2) == architecture(cfg)
  assert_same_params(params_of(load_model_dir(out)[1]), params_of(model))


@pytest.mark.parametrize("name,overrides", [
    ("tiny_gemma1", {}), ("tiny_gemma1", dict(num_kv_heads=4)),  # multi-head: qkv_einsum
    ("tiny_gemma2", {}), ("tiny_gemma3", {})])
def test_official_round_trip(tmp_path, name, overrides):
  cfg, model = tiny(name, **overrides)
  tree = to_official(cfg, params_of(model))
  attn = {k.rsplit("/", 1)[1] for k in tree if k.startswith("transformer/layer_0/attn/")}
  projections = {"qkv_einsum"} if cfg.num_heads == cfg.num_kv_heads else {"q_einsum", "kv_einsum"}
  assert attn - {"attn_vec_einsum", "_query_norm", "_key_norm"} == projections
  gating = tree["transformer/layer_0/mlp"]["gating_einsum"].shape
  assert gating == ((2, cfg.embed_dim, cfg.hidden_dim) if name == "tiny_gemma1" else
                    (2, cfg.hidden_dim, cfg.embed_dim))
  ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", tree)
  (tmp_path / "tokenizer.model").write_bytes(b"spm")  # Kaggle puts it beside the checkpoint
  cfg2, out = import_checkpoint("official", tmp_path / "ckpt", tmp_path / "model")
  assert cfg2.name == (cfg.name if not overrides else "ckpt")
  _, model2, tokenizer = load_model_dir(out, dtype="float32")
  assert tokenizer.read_bytes() == b"spm"
  assert_same_params(params_of(model2), params_of(model))
  tokens = jnp.asarray(random_tokens(cfg, (2, 12)))
  np.testing.assert_allclose(forward(model2, tokens), forward(model, tokens), rtol=1e-6,
                             atol=1e-6)


def test_official_names_follow_the_gemma_library():
  cfg, model = tiny("tiny_gemma3")
  tree = to_official(cfg, params_of(model))
  assert set(tree["transformer/layer_6/attn/_query_norm"]) == {"scale"}
  assert tree["transformer/layer_0/attn/kv_einsum"]["w"].shape == (2, 2, 64, 16)
  assert tree["transformer/embedder"]["input_embedding"].shape == (512, 64)
  assert len([k for k in tree if k.endswith("/post_ffw_norm")]) == cfg.num_layers


def rewrite_safetensors(hf_dir, change) -> None:
  tensors = load_file(hf_dir / "model.safetensors")
  change(tensors)
  save_file(tensors, hf_dir / "model.safetensors")


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \[128, 64\]\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias' \[64\]"),
    (lambda t: t.update({"model.norm.weight": np.zeros(65, np.float32)}),
     r"tensor 'model.norm.weight' has shape \[65\], expected \[64\]"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}),
     "'lm_head.weight' differs from 'model.embed_tokens.weight'"),
])
def test_mismatched_tensors_are_named(tmp_path, change, message):
  cfg, model = tiny("tiny_gemma2")
  save_model_dir(tmp_path / "model", cfg, model)
  export_hf(tmp_path / "model", tmp_path / "hf")
  rewrite_safetensors(tmp_path / "hf", change)
  with pytest.raises(ValueError, match=message):
    import_checkpoint("hf", tmp_path / "hf", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_preset_that_does_not_fit_is_refused(exported, tmp_path):
  cfg, _, _, hf_dir = exported
  other = "tiny_gemma1" if cfg.name != "tiny_gemma1" else "tiny_gemma2"
  with pytest.raises(ValueError, match=f"--model {other} does not fit: num_layers="):
    import_checkpoint("hf", hf_dir, tmp_path / "out", preset=other)


def test_sharded_export_reads_back(tmp_path):
  cfg, model = tiny("tiny_gemma3")
  save_model_dir(tmp_path / "model", cfg, model)
  export_hf(tmp_path / "model", tmp_path / "hf", shard_bytes=200_000)
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  _, out = import_checkpoint("hf", tmp_path / "hf", tmp_path / "back")
  assert_same_params(params_of(load_model_dir(out)[1]), params_of(model))


def test_gemma3_multimodal_checkpoint_gives_its_text_decoder(tmp_path):
  """Gemma3ForConditionalGeneration nests the decoder under language_model; vision is skipped."""
  cfg, model = tiny("tiny_gemma3")
  save_model_dir(tmp_path / "model", cfg, model)
  hf_dir = export_hf(tmp_path / "model", tmp_path / "hf")
  tensors = {k.replace("model.", "language_model.model.", 1): v
             for k, v in load_file(hf_dir / "model.safetensors").items()}
  tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
  (tmp_path / "mm").mkdir()
  save_file(tensors, tmp_path / "mm" / "model.safetensors")
  text = json.loads((hf_dir / "config.json").read_text())
  config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": text, "vision_config": {"hidden_size": 8}}
  (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
  _, out = import_checkpoint("hf", tmp_path / "mm", tmp_path / "back")
  assert_same_params(params_of(load_model_dir(out)[1]), params_of(model))


def test_cli_rejects_bad_arguments(capsys):
  for argv in (["--from", "onnx", "x", "--to", "y"], ["--from", "hf", "x"],
               ["--from", "model", "x", "--to", "y"]):
    with pytest.raises(SystemExit):
      convert_main(argv)
  assert "unknown format 'onnx'" in capsys.readouterr().err


def test_export_refuses_what_hf_cannot_express(tmp_path):
  cfg, model = tiny("tiny_gemma1", query_pre_attn_scalar=24)
  save_model_dir(tmp_path / "model", cfg, model)
  with pytest.raises(ValueError, match="HF Gemma scales queries by head_dim"):
    export_hf(tmp_path / "model", tmp_path / "hf")


def test_bfloat16_params(exported, tmp_path):
  cfg, model, _, hf_dir = exported
  cfg2, out = import_checkpoint("hf", hf_dir, tmp_path / "bf16", param_dtype="bfloat16")
  assert cfg2.param_dtype == "bfloat16"
  params = params_of(load_model_dir(out)[1])
  expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params_of(model))
  assert_same_params(params, expected)


def test_exported_tokenizer_loads_in_transformers(tmp_path):
  spm = train_sentencepiece(CORPUS, tmp_path / "spm", 512)
  cfg, model = tiny("tiny_gemma2")
  save_model_dir(tmp_path / "model", cfg, model, tokenizer_model=spm)
  export_hf(tmp_path / "model", tmp_path / "hf")
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  ours = Tokenizer(spm)
  for text in CORPUS.read_text().splitlines()[:20] + ["<start_of_turn>user\nHi<end_of_turn>\n"]:
    assert theirs(text).input_ids == ours.encode(text, add_bos=True), text
