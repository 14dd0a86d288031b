"""Building, shaping and counting the model's parameters without holding more than needed."""

from __future__ import annotations

import math

import jax
from flax import nnx

from gemma_jax.config import ModelConfig
from gemma_jax.model.transformer import Transformer


def init_model(cfg: ModelConfig, seed: int | jax.Array = 0) -> Transformer:
  """A Transformer with freshly initialised weights (use sharding.py for sharded init)."""
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with jax.ShapeDtypeStruct leaves: shapes and axes, no memory."""
  return nnx.eval_shape(lambda: init_model(cfg))


def param_axes(state: nnx.State) -> nnx.State:
  """The logical axis names of every parameter, as a pytree matching `state`."""
  return jax.tree.map(lambda v: v.axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_count(cfg: ModelConfig) -> int:
  _, state = nnx.split(abstract_model(cfg))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def param_count_breakdown(cfg: ModelConfig) -> dict[str, int]:
  """Total, embedding, per-layer and final-norm parameter counts."""
  model = abstract_model(cfg)
  count = lambda m: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(m)))
  layers = count(model.layers)
  return dict(total=count(model), embedding=count(model.embedder),
              per_layer=layers // cfg.num_layers, layers=layers,
              final_norm=count(model.final_norm))
