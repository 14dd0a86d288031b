"""LoRA and QLoRA for the Gemma model: adapters, a quantized frozen base, merging.

  model = lora.apply(model, LoRAConfig(rank=16, alpha=32, quantize="nf4"))  # in place
  trainable = nnx.state(model, lora.TRAINABLE)   # the adapters: all that gets gradients
  frozen = nnx.state(model, lora.FROZEN)         # the base (int8 / 4-bit codes + scales)
  plain = lora.merge(model)                      # a plain Transformer with W + alpha/r A B
  recipe = lora.recipe(cfg)                      # a LoRA run's model (gemma_jax.train_state)
  python -m gemma_jax.lora merge --base BASE_DIR --adapters SFT_WORKDIR --out MERGED_DIR

A LoRA run is a model transform (`apply`, after the base weights are in place) plus the
trainable filter, both in `recipe`; nothing else in the trainer knows about LoRA. Loading a
LoRA run's workdir is gemma_jax.model_dir's job.

Targets name the weights of every layer: q_einsum, kv_einsum (keys and values, one adapter
per slice), attn_vec_einsum (the output projection), gating_einsum (gate and up, one adapter
each) and linear (down). An adapter adds dropout(x) A B * alpha / rank to the weight's output
(model/adapters.py); B starts at zero, so a fresh adapter changes nothing. Quantization
(`quantize`, QLoRA) stores all five weight kinds of the base block-wise as int8, int4 or NF4
(gemma_jax/quant.py) and dequantizes them inside the matmuls; embeddings and norms keep the
model's param_dtype.

Why not a library. Both candidates were checked against this model:
- flax's nnx.LoRA / nnx.LoRALinear wrap a 2-D `x @ W` kernel; Gemma's weights are einsums with
  several input/output dimensions ([heads, embed, head_dim], kv's [2, kv_heads, embed, head_dim])
  stacked on a `layers` axis that lax.scan slices, and the adapters need logical axes for the
  sharding rules and per-slice use (keys vs values). We do use flax's `nnx.LoRAParam` as the
  adapters' Variable type, so `nnx.state(model, nnx.LoRAParam)` is the usual filter.
- qwix (LoRA/QLoRA by intercepting jnp.einsum / dot_general during a traced call) creates the
  adapter params lazily on the module that runs the op; our layers run as modules merged
  inside a raw `jax.lax.scan` body, where such params can neither be created nor stacked on
  the `layers` axis, and its quantized arrays do not carry our logical axes. It is also not a
  dependency of this project.
So the adapter is ~60 lines in model/adapters.py, built from each weight's own einsum
equation, with A [layers, *stack, *in, r] and B [layers, *stack, r, *out] carrying the
weight's logical axes plus `lora_rank` (kept whole by sharding.LOGICAL_RULES).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import quant
from gemma_jax.model import FeedForward, abstract_model, init_model
from gemma_jax.model.adapters import LoRA, kernel
from gemma_jax.model.attention import Einsum
from gemma_jax.train_state import ModelFn, ModelRecipe

TARGETS = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear")
QUANTIZE = ("",) + quant.MODES
# Variable filters: what a LoRA run trains, and everything else (the frozen base).
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank > 0 adapters on `targets`, scaled by alpha / rank, with input dropout; quantize:
  "" (base in param_dtype), "int8", "int4" or "nf4" with `block_size` elements per scale."""

  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS
  quantize: str = ""
  block_size: int = 64

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora.rank={self.rank!r} must be an int >= 1")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
    if not self.targets:
      raise ValueError(f"lora.targets is empty; choose some of {TARGETS}")
    if bad := [t for t in self.targets if t not in TARGETS]:
      raise ValueError(f"lora.targets: unknown {bad}; choose some of {TARGETS}")
    if self.quantize not in QUANTIZE:
      raise ValueError(f"lora.quantize={self.quantize!r}; choose one of {QUANTIZE}")
    if self.block_size < 2 or self.block_size % 2:
      raise ValueError(f"lora.block_size={self.block_size} must be an even int >= 2")

  @classmethod
  def from_config(cls, section: Mapping) -> LoRAConfig | None:
    """From the job config's `lora` section; None when lora.rank is 0 (full training)."""
    if not section["rank"]:
      return None
    return cls(rank=int(section["rank"]), alpha=float(section["alpha"]),
               dropout=float(section["dropout"]), targets=tuple(section["targets"]),
               quantize=section["quantize"], block_size=int(section["block_size"]))


def weights(model: nnx.Module) -> Iterator[tuple[tuple, str, nnx.Module, str, str]]:
  """(module path, target name, module, weight attribute, per-slice einsum) of every weight
  LoRA and quantization can touch."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Einsum):
      yield tuple(path), str(path[-1]), node, "w", node.equation
    elif isinstance(node, FeedForward):
      for name, equation in FeedForward.EQUATIONS.items():
        yield tuple(path), name, node, name, equation


def apply(model: nnx.Module, cfg: LoRAConfig, *, seed: int | jax.Array = 0) -> nnx.Module:
  """Add adapters (B = 0) to cfg.targets and quantize the base if cfg.quantize; in place."""
  rngs = nnx.Rngs(params=seed)
  for _, target, module, name, equation in weights(model):
    if target not in cfg.targets:
      continue
    if getattr(module, f"{name}_lora") is not None:
      raise ValueError(f"{target}: already has a LoRA adapter")
    var = getattr(module, name)
    setattr(module, f"{name}_lora",
            LoRA(equation, var.shape, var.axes, rank=cfg.rank, alpha=cfg.alpha,
                 dropout=cfg.dropout, rngs=rngs))
  if cfg.quantize:
    quantize(model, cfg.quantize, cfg.block_size)
  return model


def quantize(model: nnx.Module, mode: str, block_size: int = 64) -> nnx.Module:
  """Store every LoRA-able weight as `mode` codes + block scales (in place); the forward pass
  dequantizes them on the fly. Usable without adapters (quantized inference)."""
  for _, target, module, name, _ in weights(model):
    if getattr(module, f"{name}_quant") is not None:
      raise ValueError(f"{target}: already quantized")
    var = getattr(module, name)
    spec = quant.QuantSpec(mode, block_size, quant.block_axis(var.axes))
    quant.check_blockable(var.shape, spec, f"{target} ({name})")
    codes, scales = quant.quantize(var[...], spec)
    setattr(module, name, nnx.Param(codes, axes=var.axes))
    setattr(module, f"{name}_scale", nnx.Param(scales, axes=var.axes))
    setattr(module, f"{name}_quant", spec)
  return model


def merge(model: nnx.Module) -> nnx.Module:
  """A plain model of the same config whose weights are W + alpha / rank A B (W dequantized
  if stored quantized), in the config's param_dtype. The input is left unchanged."""
  cfg = model.config
  graphdef, state = nnx.split(abstract_model(cfg))
  pure = nnx.state(model, FROZEN).to_pure_dict()
  for path, _, module, name, _ in weights(model):
    w = kernel(module, name, jnp.float32)
    if (adapter := getattr(module, f"{name}_lora")) is not None:
      w = w + adapter.delta()
    node = pure
    for key in path:
      node = node[key]
    node[name] = w.astype(cfg.param_dtype)
    node.pop(f"{name}_scale", None)
  state.replace_by_pure_dict(pure)
  return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class Adapt:
  """The model transform of a LoRA run: `apply` with the run's seed."""

  cfg: LoRAConfig

  def __call__(self, model: nnx.Module, seed: int) -> nnx.Module:
    return apply(model, self.cfg, seed=seed)


def recipe(cfg: LoRAConfig, make_model: ModelFn = init_model) -> ModelRecipe:
  """A LoRA run's model: make_model's module with adapters (and a quantized base) added once
  its weights are in place, and only the adapters trainable."""
  return ModelRecipe(make_model, transform=Adapt(cfg), trainable=TRAINABLE)


def count(model: nnx.Module, what=TRAINABLE) -> int:
  """Number of elements of the Variables matched by `what`."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, what)))


def state_bytes(model: nnx.Module, what=nnx.Param) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, what)))
