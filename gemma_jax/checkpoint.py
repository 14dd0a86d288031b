"""Model directories: the weights, ModelConfig and tokenizer of one model, saved atomically.

Layout of a model directory (what `gemma_jax.convert` writes and generate/serve/trainers read):
  config.json       dataclasses.asdict(ModelConfig)
  tokenizer.model   SentencePiece model (optional)
  params/           orbax checkpoint of the parameter tree (nnx.State.to_pure_dict())

Everything is written into a sibling temporary directory which is renamed into place last, so
a crash mid-save never leaves a half-written model under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gemma_jax.config import ModelConfig
from gemma_jax.model import Transformer, abstract_model

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"


def save_model_dir(directory: str | os.PathLike, cfg: ModelConfig, params,
                   tokenizer_model: bytes | str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
  """Save params (an nnx.State, a pure dict, or a Transformer) with their config and tokenizer."""
  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"model directory {directory} exists; pass overwrite=True to replace it")
  if isinstance(params, Transformer):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = params.to_pure_dict()
  staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(staging / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  (staging / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  if tokenizer_model is not None:
    data = (tokenizer_model if isinstance(tokenizer_model, bytes)
            else Path(tokenizer_model).read_bytes())
    (staging / TOKENIZER_FILE).write_bytes(data)
  _replace_dir(staging, directory)
  return directory


def _replace_dir(new: Path, target: Path) -> None:
  old = target.with_name(f".{target.name}.old-{os.getpid()}")
  if target.exists():
    target.rename(old)
  new.rename(target)
  shutil.rmtree(old, ignore_errors=True)


def load_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; is {directory} a model directory "
                            f"(config.json, params/, tokenizer.model)?")
  fields = json.loads(path.read_text())
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown := set(fields) - known:
    raise ValueError(f"{path}: unknown ModelConfig field(s) {sorted(unknown)}")
  fields["attention_pattern"] = tuple(fields["attention_pattern"])
  return ModelConfig(**{**fields, **overrides})


def load_model_dir(directory: str | os.PathLike, shardings=None,
                   **config_overrides) -> tuple[ModelConfig, Transformer, Path | None]:
  """(config, model, tokenizer path or None) from a model directory.

  shardings: optional pytree of jax.sharding.Sharding matching the parameter pure dict; each
  array is restored straight into its shards. config_overrides change numerics only (e.g.
  dtype='float32', param_dtype='bfloat16'); shapes must match the saved ones.
  """
  directory = Path(directory).absolute()
  cfg = load_config(directory, **config_overrides)
  model = abstract_model(cfg)
  graphdef, abstract = nnx.split(model)
  target = abstract.to_pure_dict()
  if shardings is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          target, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          target)
  try:
    params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{directory / PARAMS_DIR}: parameters do not match {cfg.name!r}: {e}") from e
  abstract.replace_by_pure_dict(params)
  tokenizer = directory / TOKENIZER_FILE
  return cfg, nnx.merge(graphdef, abstract), tokenizer if tokenizer.is_file() else None
