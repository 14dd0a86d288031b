"""The train state and the run layout: which arrays a training run holds and where they live.

`TrainState` is a pytree of `params` (what gets gradients and optimizer moments),
`opt_state`, `step`, `rng` (key data) and `frozen`: the parameters that do not train (a LoRA
run's base, possibly quantized), None when everything trains. Its static `trainable` filter
says which of the model's nnx Variables are `params`; `model_params()` is the whole model's
parameter dict, what a forward pass, evaluation and sampling use.

A `ModelRecipe` says how a run makes its model: the task's module (a Transformer, a reward
model), an optional transform applied once the base weights are in place (LoRA's adapters and
quantized base) and the trainable filter. Weights from elsewhere (config.init_from) always
fill the untransformed model, so no transform needs a loader of its own.

A `RunLayout` is built once per run from (ModelConfig, optimizer, mesh, recipe): one trace of
the model gives its graphdef and the abstract state with the rule table's shardings (ZeRO-3:
the moments share their parameters' shardings). Init, restore, the train step, the sampler and
the AOT compile all take their shapes and shardings from it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import sharding
from gemma_jax.config import ModelConfig
from gemma_jax.model import init_model

# (ModelConfig, seed) -> the module a task trains (a Transformer; the reward trainer's adds a
# value head).
ModelFn = Callable[[ModelConfig, int], nnx.Module]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a step updates, and the frozen weights it reads (see the module docstring).
  Works as a tree of arrays, of shardings or of ShapeDtypeStructs."""

  params: Any
  opt_state: Any
  step: Any
  rng: Any
  frozen: Any = None
  trainable: Any = dataclasses.field(default=nnx.Param, metadata=dict(static=True))

  @classmethod
  def create(cls, model: nnx.Module, optimizer: optax.GradientTransformation, seed: int,
             trainable=nnx.Param) -> TrainState:
    """The state at step 0 of `model`, whose `trainable` Variables get optimizer moments."""
    params, frozen = split_params(model, trainable)
    return cls(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
               rng=jax.random.key_data(jax.random.key(seed)), frozen=frozen,
               trainable=trainable)

  def model_params(self) -> dict:
    """The whole model's parameter dict: params, with the frozen part merged in."""
    return self.params if self.frozen is None else _deep_merge(self.frozen, self.params)

  def replace(self, **changes) -> TrainState:
    return dataclasses.replace(self, **changes)


def split_params(model: nnx.Module, trainable) -> tuple[dict, dict | None]:
  """(trainable, frozen or None) parameter pure dicts of `model`."""
  params = nnx.state(model, trainable).to_pure_dict()
  frozen = nnx.state(model, _frozen_filter(trainable)).to_pure_dict()
  return params, frozen or None


def _frozen_filter(trainable):
  return nnx.All(nnx.Param, nnx.Not(trainable))


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
  """How a run makes its model: make_model(cfg, seed), then `base` weights (when given) in
  place of the random ones, then transform(model, seed) (LoRA: gemma_jax.lora.recipe)."""

  make_model: ModelFn = init_model
  transform: Callable[[nnx.Module, int], nnx.Module] | None = None
  trainable: Any = nnx.Param

  def build(self, cfg: ModelConfig, seed: int, base: dict | None = None) -> nnx.Module:
    """The model; `base` is a parameter pure dict of make_model's module, possibly partial
    (e.g. a language model's weights for a reward model: its head keeps the random init)."""
    model = self.make_model(cfg, seed)
    if base is not None:
      state = nnx.state(model, nnx.Param)
      state.replace_by_pure_dict(base)
      nnx.update(model, state)
    return model if self.transform is None else self.transform(model, seed)

  def abstract(self, cfg: ModelConfig) -> nnx.Module:
    """The built model with ShapeDtypeStruct leaves: shapes and axes, no memory."""
    return nnx.eval_shape(lambda: self.build(cfg, 0))

  def materialize(self, cfg: ModelConfig, seed: int, base: dict | None = None,
                  mesh: Mesh | None = None) -> nnx.Module:
    """`build` as one jitted program (random weights that `base` replaces are never made),
    straight into the rule table's shardings on `mesh` (else on one device)."""
    graphdef, state = nnx.split(self.abstract(cfg))
    shardings = None if mesh is None else sharding.param_shardings(state, mesh)
    values = run_init(lambda b: nnx.split(self.build(cfg, seed, b))[1].to_pure_dict(),
                      shardings, base)
    state.replace_by_pure_dict(values)
    return nnx.merge(graphdef, state)


def run_init(fn: Callable[[Any], Any], out_shardings, base):
  """jit(fn)(base) into out_shardings, donating a given base."""
  init = jax.jit(fn, out_shardings=out_shardings, donate_argnums=() if base is None else 0)
  with warnings.catch_warnings():
    # A quantized base has other shapes than the donated float one: nothing to alias, but
    # donating still frees the float copy.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return init(base)


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """The shapes and shardings of one run's state, traced once (see the module docstring)."""

  cfg: ModelConfig
  optimizer: optax.GradientTransformation
  mesh: Mesh
  recipe: ModelRecipe
  graphdef: Any  # merges with a state's model_params() into the model
  abstract: TrainState  # ShapeDtypeStructs carrying their shardings

  @classmethod
  def build(cls, cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
            recipe: ModelRecipe = ModelRecipe()) -> RunLayout:
    model = recipe.abstract(cfg)
    params = sharding.laid_out(nnx.state(model, recipe.trainable), mesh)
    frozen = sharding.laid_out(nnx.state(model, _frozen_filter(recipe.trainable)), mesh)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = sharding.tree_shardings_like(opt_state, params, _shardings(params), mesh)
    replicated = sharding.replicated(mesh)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    abstract = TrainState(
        params=params, opt_state=_with_shardings(opt_state, opt_shardings),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated),
        frozen=frozen or None, trainable=recipe.trainable)
    return cls(cfg, optimizer, mesh, recipe, nnx.graphdef(model), abstract)

  @property
  def shardings(self) -> TrainState:
    return _shardings(self.abstract)

  @functools.cached_property
  def base_abstract(self) -> dict:
    """ShapeDtypeStructs (with shardings) of the untransformed model's parameters: what
    config.init_from is loaded into."""
    if self.recipe.transform is None:
      return self.abstract.model_params()
    base = nnx.eval_shape(lambda: self.recipe.make_model(self.cfg, 0))
    return sharding.laid_out(nnx.state(base, nnx.Param), self.mesh)

  def model(self, params: dict) -> nnx.Module:
    """The model with these parameters (a state's model_params())."""
    return nnx.merge(self.graphdef, nnx.State(params))

  def init(self, seed: int, base: dict | None = None) -> TrainState:
    """The state at step 0, made straight into its shards (no host holds the whole model);
    `base` (sharded, donated) replaces make_model's random weights."""
    return run_init(self._init_fn(seed), self.shardings, base)

  def initial(self, field: str, seed: int, base: dict | None = None):
    """One field of `init`'s state (XLA computes only that): a restored LoRA run's frozen
    base, RLHF's reference policy."""
    init = self._init_fn(seed)
    return run_init(lambda b: getattr(init(b), field), getattr(self.shardings, field), base)

  def _init_fn(self, seed: int) -> Callable[[dict | None], TrainState]:
    return lambda base: TrainState.create(self.recipe.build(self.cfg, seed, base),
                                          self.optimizer, seed, self.recipe.trainable)

  def check_replication(self, max_fraction: float) -> dict[str, float]:
    """sharding.check_replication over the whole model's parameters."""
    params = self.abstract.model_params()
    return sharding.check_replication(params, _shardings(params), max_fraction)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _shardings(tree):
  return jax.tree.map(lambda a: a.sharding, tree)
