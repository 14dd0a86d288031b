"""Model directories: save/load round trip, atomic replacement, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax.checkpoint import save_model_dir
from gemma_jax.model_dir import load_model_dir
from model_utils import random_model, random_tokens


def test_round_trip_gives_same_logits(tmp_path):
  cfg, model = random_model("tiny_gemma3")
  save_model_dir(tmp_path / "m", cfg, model, tokenizer_model=b"spm-bytes")
  cfg2, model2, tok = load_model_dir(tmp_path / "m")
  assert cfg2 == cfg and tok.read_bytes() == b"spm-bytes"
  tokens = jnp.asarray(random_tokens(cfg, (2, 10)))
  np.testing.assert_array_equal(model(tokens), model2(tokens))


def test_load_casts_to_requested_param_dtype(tmp_path):
  cfg, model = random_model("tiny_gemma1")
  save_model_dir(tmp_path / "m", cfg, nnx.state(model, nnx.Param))
  _, model2, tok = load_model_dir(tmp_path / "m", param_dtype="bfloat16")
  assert tok is None
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model2, nnx.Param))}
  assert dtypes == {jnp.dtype("bfloat16")}


def test_existing_directory_is_kept_unless_overwrite(tmp_path):
  cfg, model = random_model("tiny_gemma1")
  save_model_dir(tmp_path / "m", cfg, model)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_model_dir(tmp_path / "m", cfg, model)
  save_model_dir(tmp_path / "m", cfg.replace(norm_eps=1e-5), model, overwrite=True)
  assert load_model_dir(tmp_path / "m")[0].norm_eps == 1e-5
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging leftovers


def test_bad_directories_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json: not found"):
    load_model_dir(tmp_path)
  cfg, model = random_model("tiny_gemma1")
  save_model_dir(tmp_path / "m", cfg, model)
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "bogus": 1}))
  with pytest.raises(ValueError, match=r"config.json: unknown ModelConfig field\(s\) \['bogus'\]"):
    load_model_dir(tmp_path / "m")
  (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_dim": 96}))
  with pytest.raises(ValueError, match="parameters do not match"):
    load_model_dir(tmp_path / "m")
