"""Defaults shared by every job config; job files override what differs.

Every ModelConfig field can be overridden under `model` (None = the preset's value), e.g.
`--config.model.remat_policy=full`.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from gemma_jax.config import ModelConfig

_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _model_overrides() -> dict:
  out = {}
  for f in dataclasses.fields(ModelConfig):
    if f.name == "name":
      continue
    kind = str(f.type).split(" | ")[0].split("[")[0]
    out[f.name] = config_dict.placeholder(_FIELD_TYPES.get(kind, object))
  return out


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"preset": "tiny_gemma3", **_model_overrides()})
  # Mesh sizes; one may be -1 (fill). dcn_* = slices in a multi-slice pod.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                          dcn_tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(
      # Fail at start-up when more than this fraction of parameter bytes is replicated.
      max_replicated_fraction=0.05))
  c.train = ml_collections.ConfigDict(dict(
      steps=100, global_batch_size=8, seq_len=128, microbatches=1, seed=0, z_loss=0.0,
      loss_chunk_size=4096))
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, schedule="cosine", warmup_steps=10, end_lr_fraction=0.1, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=0.1, decay_embedding=False, decay_norms=False,
      grad_clip_norm=1.0))
  return c


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig named by config.model.preset with the non-None overrides applied."""
  from gemma_jax.config import get_config as preset

  overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
  if "attention_pattern" in overrides:
    overrides["attention_pattern"] = tuple(overrides["attention_pattern"])
  return preset(c.model.preset, **overrides)
