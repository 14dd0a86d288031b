"""The files of a run's workdir besides its checkpoints: config.json (the ModelConfig, as in a
model directory, so that generate and serve load the workdir), train_config.json (the job
config), lora.json (a LoRA run: gemma_jax.model_dir) and tokenizer.model."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import jax
import ml_collections

from configs.base import ConfigError
from gemma_jax import checkpoint, distributed, model_dir
from gemma_jax import lora as lora_lib
from gemma_jax.config import NUMERICS_FIELDS, ModelConfig
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

TRAIN_CONFIG_FILE = "train_config.json"


def create(workdir: Path) -> None:
  """The workdir, which must be a directory every host sees (multi-host checkpoints)."""
  workdir.mkdir(parents=True, exist_ok=True)
  distributed.check_shared_directory(workdir, "--workdir")


def write_files(workdir: Path, config: ml_collections.ConfigDict,
                         model_cfg: ModelConfig, lora: lora_lib.LoRAConfig | None) -> None:
  """config.json (the ModelConfig, as in a model directory), train_config.json and a LoRA
  run's lora.json; a workdir that already holds another model is refused."""
  path = workdir / checkpoint.CONFIG_FILE
  new = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # tuples as lists
  if path.is_file():
    old = json.loads(path.read_text())
    differ = sorted(k for k in new if k not in NUMERICS_FIELDS and old.get(k) != new[k])
    if differ:
      raise ConfigError(f"config.model: the workdir {workdir} holds a model with other "
                        f"{differ} ({ {k: old.get(k) for k in differ} }); use a new --workdir")
  _write_atomic(path, json.dumps(new, indent=2) + "\n")
  _write_atomic(workdir / TRAIN_CONFIG_FILE, config.to_json_best_effort(indent=2))
  if lora is not None:
    base = os.path.abspath(config.init_from) if config.init_from else ""
    model_dir.write_lora_run(workdir, lora, base, config.train.seed)


def tokenizer(tok: ml_collections.ConfigDict, workdir: Path, model_cfg: ModelConfig) -> Tokenizer:
  tokenizer = Tokenizer(_tokenizer_file(tok, workdir))
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"config.tokenizer: {tokenizer.vocab_size} pieces do not fit the "
                      f"model's vocab_size={model_cfg.vocab_size} (config.model)")
  return tokenizer


def _tokenizer_file(tok: ml_collections.ConfigDict, workdir: Path) -> Path:
  """WORKDIR/tokenizer.model: a copy of tokenizer.path, or trained on tokenizer.train_corpus
  (once; a resumed run reuses it). With several processes, process 0 makes it and every
  process uses process 0's bytes, so all hosts tokenize alike."""
  target = workdir / checkpoint.TOKENIZER_FILE
  if jax.process_index() != 0:
    data = distributed.broadcast_bytes(None)
    if not target.is_file() or target.read_bytes() != data:
      _write_atomic(target, data)
    return target
  if tok.path:
    data = Path(tok.path).read_bytes()
    if not target.is_file() or target.read_bytes() != data:
      _write_atomic(target, data)
  elif not target.is_file():
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
      trained = train_sentencepiece(tok.train_corpus, Path(tmp) / "spm", tok.vocab_size)
      os.replace(trained, target)
  if jax.process_count() > 1:
    distributed.broadcast_bytes(target.read_bytes())
  return target


def _write_atomic(path: Path, data: str | bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)
