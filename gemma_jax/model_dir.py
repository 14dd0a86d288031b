"""Every directory that loads as a model: which kind it is, and its model on a mesh.

Commands that take a model (generate, serve, convert --to-hf, a trainer's config.init_from,
RLHF's reward model) read it with `load_model_dir`, which knows four kinds:

  model    config.json + params/ [+ tokenizer.model]: what convert and save_model_dir write
  workdir  a trainer's --workdir: config.json + checkpoints/<step>/ (the newest by default)
  reward   a reward trainer's workdir: the same, with a `reward_head` among the params
  lora     a LoRA run's workdir: + lora.json, naming the base it adapts: base + adapters

With a mesh every array goes straight into the rule table's shardings (sharding.py); without
one, onto the first device. This module sits above checkpoint.py (the files) and lora (the
transform), so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import checkpoint, lora, sharding
from gemma_jax.checkpoint import PARAMS_DIR, TOKENIZER_FILE, TRAIN_CHECKPOINT_DIR, load_config
from gemma_jax.config import ModelConfig
from gemma_jax.model import init_model
from gemma_jax.reward_model import init_reward_model

KINDS = ("model", "workdir", "reward", "lora")
LORA_FILE = "lora.json"  # in a LoRA run's workdir: the LoRAConfig and the base it adapts
Loaded = tuple[ModelConfig, nnx.Module, Path | None]  # (config, model, tokenizer.model or None)


def kind(directory: str | os.PathLike) -> str:
  """Which of KINDS `directory` is (a directory of none of them reads as "model", whose
  loading then says what is missing)."""
  directory = Path(directory)
  if (directory / PARAMS_DIR).exists() or not (directory / TRAIN_CHECKPOINT_DIR).is_dir():
    return "model"
  if (directory / LORA_FILE).is_file():
    return "lora"
  params = checkpoint.params_metadata(directory)
  return "reward" if params is not None and "reward_head" in params else "workdir"


def load_model_dir(directory: str | os.PathLike, mesh: Mesh | None = None, *,
                   step: int | None = None, **config_overrides) -> Loaded:
  """(config, model, tokenizer path or None) from a directory of any kind.

  step: the checkpoint of a workdir (default: the newest). config_overrides change numerics
  only (e.g. dtype='float32', param_dtype='bfloat16'); the shapes must match the saved ones.
  """
  directory = Path(directory).absolute()
  what = kind(directory)
  if what == "lora":
    return load_lora_run(directory, step=step, mesh=mesh, **config_overrides)
  cfg = load_config(directory, **config_overrides)
  make = init_reward_model if what == "reward" else init_model
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(cfg)))
  target = sharding.laid_out(abstract, mesh)
  if what == "model":
    params = checkpoint.restore_params(directory, target)
  else:
    params = checkpoint.restore_train_params(directory, target, step)
  abstract.replace_by_pure_dict(params)
  return cfg, nnx.merge(graphdef, abstract), _tokenizer(directory)


def load_params(directory: str | os.PathLike, like: dict, mesh: Mesh,
                **config_overrides) -> dict:
  """The parameter pure dict of the model in `directory`, on `mesh`, refused unless it has the
  shapes of `like` (a parameter tree) at every path: it may lack some of like's paths (a
  language model's weights for a reward model, whose head is then left out)."""
  got = _shapes(nnx.state(nnx.eval_shape(lambda: _loader(directory)(
      load_config(directory))), nnx.Param).to_pure_dict())
  if got != _pick(_shapes(like), got):
    raise ValueError("its parameters do not have the shapes of this model")
  _, model, _ = load_model_dir(directory, mesh, **config_overrides)
  if kind(directory) == "lora":  # a LoRA run starts others as its merged weights
    model = lora.merge(model)
  return nnx.state(model, nnx.Param).to_pure_dict()


def load_reward_model(workdir: str | os.PathLike, mesh: Mesh | None = None,
                      step: int | None = None, **config_overrides) -> Loaded:
  """As load_model_dir, for a reward trainer's workdir only."""
  if kind(workdir) != "reward":
    raise ValueError(f"{workdir}: not a reward model (a workdir of python -m trainers.reward "
                     "has a reward_head among its params)")
  return load_model_dir(workdir, mesh, step=step, **config_overrides)


# ----------------------------------------------------------------------------- LoRA runs


def write_lora_run(workdir: str | os.PathLike, cfg: lora.LoRAConfig, base: str,
                   seed: int) -> None:
  """WORKDIR/lora.json: the adapters' config and what they adapt (a directory of any kind,
  or "" for the random init of `seed`)."""
  data = {"lora": dataclasses.asdict(cfg), "base": base, "seed": seed}
  path = Path(workdir) / LORA_FILE
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  os.replace(tmp, path)


def read_lora_run(workdir: str | os.PathLike) -> tuple[lora.LoRAConfig, str, int]:
  path = Path(workdir) / LORA_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; is {workdir} the workdir of a LoRA run "
                            "(lora.rank > 0)?")
  data = checkpoint.read_json(path)
  try:
    return lora.LoRAConfig(**data["lora"]), data["base"], int(data["seed"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a lora.json of this version ({type(e).__name__}: {e})") from e


def load_lora_run(adapters: str | os.PathLike, base: str | os.PathLike | None = None,
                  step: int | None = None, *, quantized: bool = True, mesh: Mesh | None = None,
                  **config_overrides) -> Loaded:
  """(config, model with adapters, tokenizer path or None) from a LoRA run's workdir.

  base: the directory the adapters were trained on (default: the one in lora.json; a run
  from a random init rebuilds it from its seed). quantized=False keeps the base in
  param_dtype even if the run trained on a quantized one (what `merge_lora_run` wants).
  """
  adapters = Path(adapters).absolute()
  cfg_lora, run_base, seed = read_lora_run(adapters)
  base = run_base if base is None else base
  if not quantized:
    cfg_lora = dataclasses.replace(cfg_lora, quantize="")
  if base:
    cfg, base_model, tokenizer = load_model_dir(base, mesh, **config_overrides)
    base_params = nnx.state(base_model, nnx.Param).to_pure_dict()
  else:
    cfg, base_params, tokenizer = load_config(adapters, **config_overrides), None, None
  model = lora.recipe(cfg_lora).materialize(cfg, seed, base_params, mesh)
  trainable = nnx.state(model, lora.TRAINABLE)
  trainable.replace_by_pure_dict(
      checkpoint.restore_train_params(adapters, sharding.laid_out(trainable, mesh), step))
  nnx.update(model, trainable)
  return cfg, model, _tokenizer(adapters) or tokenizer


def merge_lora_run(base: str | os.PathLike | None, adapters: str | os.PathLike,
                   out: str | os.PathLike, step: int | None = None,
                   overwrite: bool = False) -> Path:
  """Fold a LoRA run's adapters into its float base and save a plain model directory
  (which `python -m gemma_jax.convert --from model OUT --to-hf DIR` exports)."""
  cfg, model, tokenizer = load_lora_run(adapters, base, step, quantized=False)
  return checkpoint.save_model_dir(out, cfg, lora.merge(model), tokenizer, overwrite=overwrite)


# ----------------------------------------------------------------------------- helpers


def _loader(directory: str | os.PathLike):
  """The ModelFn of a directory's (untransformed) model."""
  return init_reward_model if kind(directory) == "reward" else init_model


def _tokenizer(directory: Path) -> Path | None:
  path = directory / TOKENIZER_FILE
  return path if path.is_file() else None


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def _pick(tree, like):
  """The part of nested dict `tree` at the paths of `like` (None where `tree` lacks one)."""
  if not isinstance(like, dict):
    return tree
  if not isinstance(tree, dict):
    return None
  return {k: _pick(tree[k], v) if k in tree else None for k, v in like.items()}
