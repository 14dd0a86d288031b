"""Choosing the ModelConfig of a converted checkpoint: a preset when it fits, else the metadata.

A source's metadata (HF config.json, GGUF keys) is turned into a ModelConfig; when every
architectural field equals a preset's, the preset is used (its name travels with the model).
A preset matching the shapes but not the rest is reported, since some published configs carry
known errors (e.g. query_pre_attn_scalar 224 in early Gemma 2 9B configs): `--model` picks it.
"""

from __future__ import annotations

import dataclasses
import logging

from gemma_jax.config import ModelConfig, get_config, preset_names

log = logging.getLogger(__name__)

# Fields that do not describe the architecture: numerics and the name.
_NOT_ARCHITECTURE = {"name", "dtype", "param_dtype", "remat_policy", "scan_layers",
                     "attention_impl", "attention_interpret"}
SHAPE_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "hidden_dim", "use_post_attn_norm", "use_post_ffw_norm", "use_qk_norm")


def architecture(cfg: ModelConfig) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}


def shapes(cfg: ModelConfig) -> dict:
  return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


def choose(found: ModelConfig, preset: str | None, source: str,
           compare=architecture) -> ModelConfig:
  """The config to convert with: `preset` if given (checked), else a match, else `found`.

  compare: the fields `found` is known to get right (all architecture fields for metadata,
  only the shapes when they were read off the tensors).
  """
  if preset is not None:
    cfg = get_config(preset)
    if diff := _diff(compare(found), compare(cfg), fields=SHAPE_FIELDS):
      raise ValueError(f"{source}: --model {preset} does not fit: {diff}")
    if diff := _diff(compare(found), compare(cfg)):
      log.warning("%s: using preset %s, whose values differ from the source's: %s",
                  source, preset, diff)
    return cfg
  for name in preset_names():
    cfg = get_config(name)
    if compare(cfg) == compare(found):
      log.info("%s: matches preset %s", source, name)
      return cfg
    if shapes(cfg) == shapes(found):
      log.warning("%s: shapes of preset %s but %s; keeping the source's values (pass --model %s "
                  "to use the preset's)", source, name, _diff(compare(found), compare(cfg)), name)
  log.info("%s: no preset matches; using the config read from the source", source)
  return found


def _diff(found: dict, preset: dict, fields=None) -> str:
  keys = [k for k in (fields or found) if k in found and found[k] != preset[k]]
  return ", ".join(f"{k}={found[k]!r} in the source, {preset[k]!r} in the preset" for k in keys)
