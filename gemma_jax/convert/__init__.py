"""Checkpoints in and out: official Gemma Flax, Hugging Face safetensors, GGUF -> model directory.

  import_checkpoint("gguf", "gemma-3-270m.gguf", "models/g3")   # or "hf" / "official"
  export_hf("models/g3", "hf/g3")   # safetensors + config.json for transformers

A model directory (gemma_jax.checkpoint) holds the params, the ModelConfig and the tokenizer.
The command line is `python -m gemma_jax.convert`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.checkpoint import save_model_dir
from gemma_jax.model_dir import load_model_dir
from gemma_jax.config import ModelConfig
from gemma_jax.convert import torch_layout
from gemma_jax.convert.layout import scatter

FORMATS = ("official", "hf", "gguf")


def read_checkpoint(fmt: str, src: str | os.PathLike, preset: str | None = None,
                    param_dtype: str = "float32"
                    ) -> tuple[ModelConfig, dict, bytes | Path | None]:
  """(config, pure numpy param dict, tokenizer model or None) of a checkpoint in `fmt`."""
  # Each reader imports its format's package (gguf, safetensors) only when used.
  if fmt == "gguf":
    from gemma_jax.convert.gguf_file import read_gguf
    return read_gguf(src, preset, param_dtype)
  if fmt == "hf":
    from gemma_jax.convert.hf import read_hf
    return read_hf(src, preset, param_dtype)
  if fmt == "official":
    from gemma_jax.convert.official import read_official
    cfg, params = read_official(src, preset, param_dtype)
    return cfg, params, _tokenizer_near(Path(src))
  raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")


def _tokenizer_near(checkpoint: Path) -> Path | None:
  """Kaggle ships tokenizer.model inside or beside the checkpoint directory."""
  for candidate in (checkpoint / "tokenizer.model", checkpoint.parent / "tokenizer.model"):
    if candidate.is_file():
      return candidate
  return None


def import_checkpoint(fmt: str, src: str | os.PathLike, out: str | os.PathLike,
                      preset: str | None = None, param_dtype: str = "float32",
                      tokenizer: str | os.PathLike | None = None,
                      overwrite: bool = False) -> tuple[ModelConfig, Path]:
  """Convert a checkpoint into a model directory; returns its config and path.

  tokenizer: a SentencePiece model to ship instead of the one found with the checkpoint.
  """
  cfg, params, found = read_checkpoint(fmt, src, preset, param_dtype)
  _to_jax_in_place(params)  # orbax saves jax arrays several times faster than numpy ones
  return cfg, save_model_dir(out, cfg, params, tokenizer or found, overwrite=overwrite)


def _to_jax_in_place(tree: dict) -> None:
  """Replace each numpy leaf by a jax array, so only one leaf is ever held twice."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _to_jax_in_place(value)
    else:
      tree[key] = jnp.asarray(value)


def hf_tensors(cfg: ModelConfig, params: dict):
  """(name, numpy array) pairs of the HF state dict for our pure param dict, one at a time."""
  return scatter(cfg, torch_layout.rules(cfg, torch_layout.hf_names(cfg)), params)


def export_hf(model_dir: str | os.PathLike, out: str | os.PathLike,
              shard_bytes: int | None = None) -> Path:
  """Write a model directory as an HF transformers checkpoint (and its tokenizer.model)."""
  from gemma_jax.convert.hf import SHARD_BYTES, TOKENIZER_CONFIG, write_hf
  out = Path(out)
  cfg, model, tokenizer = load_model_dir(model_dir)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  tensors = ((name, np.asarray(t)) for name, t in hf_tensors(cfg, params))
  write_hf(out, cfg, tensors, shard_bytes or SHARD_BYTES)
  if tokenizer is not None:
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
  return out
