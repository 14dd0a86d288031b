"""Rules between our stacked parameter tree and a checkpoint's per-layer named tensors.

A Rule says how one of our parameters is built from (and split back into) named tensors of
another layout. `gather` checks the whole source (missing, extra, wrong shape) before it reads
anything, then fills each stacked parameter layer by layer, so only one source tensor is held
beside the output at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.config import ModelConfig
from gemma_jax.model import abstract_model

Path = tuple[str, ...]


class TensorSource(Protocol):
  """Named tensors of a checkpoint, read one at a time (as float32 or the stored float dtype)."""

  description: str  # names the file or directory in errors

  def names(self) -> set[str]: ...

  def shape(self, name: str) -> tuple[int, ...]: ...

  def get(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Rule:
  """ours (a path in our pure dict) <-> theirs (tensor names; '{i}' is the layer index)."""

  ours: Path
  theirs: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]  # of each `theirs` tensor
  to_ours: Callable[..., np.ndarray]
  to_theirs: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None  # None: read-only

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.theirs[0]

  def names(self, num_layers: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    layers = range(num_layers) if self.per_layer else [None]
    for i in layers:
      for template, shape in zip(self.theirs, self.shapes):
        yield template.format(i=i), shape


def identity(ours: Path, theirs: str, shape: tuple[int, ...], offset: float = 0.0) -> Rule:
  """A tensor stored as is; `offset` is added on their side (GGUF stores norms as 1 + w)."""
  return Rule(ours, (theirs,), (shape,), lambda x: x - offset if offset else x,
              lambda w: (w + offset if offset else w,))


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
  """Every parameter of the model for cfg, by path, with its (stacked) shape."""
  pure = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {tuple(k.key for k in path): tuple(x.shape) for path, x in leaves}


def check_source(cfg: ModelConfig, rules: list[Rule], source: TensorSource,
                 ignore: Callable[[str], bool] = lambda name: False) -> None:
  """Raise a ValueError naming every missing, extra or misshapen tensor of `source`."""
  _check_rules_cover_model(cfg, rules)
  expected = dict(name_shape for r in rules for name_shape in r.names(cfg.num_layers))
  present = {n for n in source.names() if not ignore(n)}
  problems = [f"missing tensor {n!r} (expected shape {list(s)})"
              for n, s in expected.items() if n not in present]
  problems += [f"unexpected tensor {n!r} {list(source.shape(n))}"
               for n in sorted(present - expected.keys())]
  problems += [f"tensor {n!r} has shape {list(source.shape(n))}, expected {list(s)}"
               for n, s in expected.items() if n in present and tuple(source.shape(n)) != s]
  if problems:
    shown = "\n  ".join(problems[:20] + ([f"... {len(problems) - 20} more"]
                                           if len(problems) > 20 else []))
    raise ValueError(f"{source.description} does not match model config {cfg.name!r}:\n  {shown}")


def _check_rules_cover_model(cfg: ModelConfig, rules: list[Rule]) -> None:
  ours, covered = set(param_shapes(cfg)), {r.ours for r in rules}
  if ours != covered:  # a mapping bug, not a user error
    raise AssertionError(f"conversion rules for {cfg.name!r}: uncovered {sorted(ours - covered)}, "
                         f"unknown {sorted(covered - ours)}")


def gather(cfg: ModelConfig, rules: list[Rule], source: TensorSource,
           ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """Our pure parameter dict (numpy, cfg.param_dtype) from a checked source."""
  check_source(cfg, rules, source, ignore)
  shapes, dtype = param_shapes(cfg), np.dtype(jnp.dtype(cfg.param_dtype))
  params: dict = {}
  for rule in rules:
    if rule.per_layer:
      out = np.empty(shapes[rule.ours], dtype)
      for i in range(cfg.num_layers):
        out[i] = rule.to_ours(*(source.get(t.format(i=i)) for t in rule.theirs))
    else:  # no staging copy: the embedding is the largest tensor
      out = np.asarray(rule.to_ours(*(source.get(t) for t in rule.theirs)), dtype)
      assert out.shape == shapes[rule.ours], (rule.ours, out.shape)
    _set(params, rule.ours, out)
  return params


def scatter(cfg: ModelConfig, rules: list[Rule], params: dict) -> Iterator[tuple[str, np.ndarray]]:
  """(name, tensor) pairs of the other layout, one at a time, from our pure dict."""
  _check_rules_cover_model(cfg, rules)
  for rule in rules:
    if rule.to_theirs is None:
      raise ValueError(f"rule for {'/'.join(rule.ours)} can only read")
    value = _get(params, rule.ours)
    for i in range(cfg.num_layers) if rule.per_layer else [None]:
      tensors = rule.to_theirs(np.asarray(value if i is None else value[i]))
      for template, shape, tensor in zip(rule.theirs, rule.shapes, tensors):
        assert tensor.shape == shape, (template, tensor.shape, shape)
        yield template.format(i=i), np.ascontiguousarray(tensor)


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: Path):
  for key in path:
    tree = tree[key]
  return tree
