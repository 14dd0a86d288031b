"""Official Gemma Flax checkpoints (Kaggle; the `gemma` library's orbax parameter tree).

The tree is flat by module path: {'transformer/layer_0/attn/q_einsum': {'w': ...},
'transformer/layer_0/mlp': {'gating_einsum': ..., 'linear': ...}, 'transformer/embedder':
{'input_embedding': ...}, ...}. We address leaves by the full '/'-joined path. The names are
ours with per-layer modules instead of a stacked `layers` axis, except that multi-head models
(num_kv_heads == num_heads) fuse q, k, v into `qkv_einsum [3, N, D, H]`, Gemma 3 names its
QK-norms `_query_norm`/`_key_norm`, and Gemma 2 and 3 store `gating_einsum` as [2, F, D].
There is no config in the checkpoint: the architecture is read off the tensor shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from gemma_jax.config import ModelConfig, get_config
from gemma_jax.convert import configs
from gemma_jax.convert.layout import Rule, gather, identity, scatter
from gemma_jax.convert.torch_layout import family

LAYER = "transformer/layer_{i}/"
EMBED = "transformer/embedder/input_embedding"
# A preset of each generation supplies what the shapes do not tell (RoPE, windows, caps).
_TEMPLATES = {1: "gemma_2b", 2: "gemma2_2b", 3: "gemma3_4b"}


class FlatSource:
  """An in-memory {'a/b/c': array} dict as a TensorSource."""

  def __init__(self, flat: dict[str, np.ndarray], description: str):
    self.flat, self.description = flat, description

  def names(self) -> set[str]:
    return set(self.flat)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.flat[name].shape)

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self.flat[name])


def rules(cfg: ModelConfig, gating_transposed: bool | None = None,
          fused_qkv: bool = False) -> list[Rule]:
  """Rules for cfg; gating_transposed defaults to the official choice (Gemma 2 and 3).

  fused_qkv reads q, k, v from `qkv_einsum` (read-only rules: to_official fuses after).
  """
  n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim, cfg.hidden_dim
  if gating_transposed is None:
    gating_transposed = family(cfg) > 1
  attn = LAYER + "attn/"
  out = [identity(("embedder", "input_embedding"), EMBED, (cfg.vocab_size, d)),
         identity(("final_norm", "scale"), "transformer/final_norm/scale", (d,)),
         identity(("layers", "attn", "attn_vec_einsum", "w"), attn + "attn_vec_einsum/w",
                  (n, h, d)),
         identity(("layers", "mlp", "linear"), LAYER + "mlp/linear", (f, d))]
  if fused_qkv:
    qkv = (attn + "qkv_einsum/w",), ((3, n, d, h),)
    out += [Rule(("layers", "attn", "q_einsum", "w"), *qkv, lambda w: w[0], None),
            Rule(("layers", "attn", "kv_einsum", "w"), *qkv, lambda w: w[1:], None)]
  else:
    out += [identity(("layers", "attn", "q_einsum", "w"), attn + "q_einsum/w", (n, d, h)),
            identity(("layers", "attn", "kv_einsum", "w"), attn + "kv_einsum/w", (2, k, d, h))]
  gating = LAYER + "mlp/gating_einsum"
  out.append(Rule(("layers", "mlp", "gating_einsum"), (gating,), ((2, f, d),),
                  lambda w: w.transpose(0, 2, 1), lambda w: (w.transpose(0, 2, 1),))
             if gating_transposed else identity(("layers", "mlp", "gating_einsum"), gating,
                                                (2, d, f)))
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  norms += ["post_attention_norm"] if cfg.use_post_attn_norm else []
  norms += ["post_ffw_norm"] if cfg.use_post_ffw_norm else []
  out += [identity(("layers", x, "scale"), f"{LAYER}{x}/scale", (d,)) for x in norms]
  if cfg.use_qk_norm:
    out += [identity(("layers", "attn", x, "scale"), f"{attn}_{x}/scale", (h,))
            for x in ("query_norm", "key_norm")]
  return out


def load_flat(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """An orbax checkpoint's tree as {'full/path': array}."""
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: not an orbax checkpoint directory")
  try:
    tree = ocp.PyTreeCheckpointer().restore(path)
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many kinds
    raise ValueError(f"{path}: not a readable orbax checkpoint (the official Flax format): "
                     f"{type(e).__name__}: {e}") from e
  flat: dict[str, np.ndarray] = {}

  def walk(node, prefix: str) -> None:
    if isinstance(node, dict):
      for key, child in node.items():
        walk(child, f"{prefix}/{key}" if prefix else key)
    else:
      flat[prefix] = node
  walk(tree, "")
  return flat


def config_from_shapes(source: FlatSource, name: str) -> ModelConfig:
  """What the tensor shapes say; the rest from a preset of the same generation."""
  shape = source.shape
  layer0 = LAYER.format(i=0)
  if f"{layer0}attn/qkv_einsum/w" in source.names():
    _, n, d, h = shape(f"{layer0}attn/qkv_einsum/w")
    k = n
  else:
    n, d, h = _shape_of(source, f"{layer0}attn/q_einsum/w", 3)
    k = _shape_of(source, f"{layer0}attn/kv_einsum/w", 4)[1]
  num_layers = sum(1 for x in source.names() if x.endswith("/pre_attention_norm/scale"))
  gen = (3 if f"{layer0}attn/_query_norm/scale" in source.names() else
         2 if f"{layer0}post_ffw_norm/scale" in source.names() else 1)
  return get_config(_TEMPLATES[gen]).replace(
      name=name, vocab_size=_shape_of(source, EMBED, 2)[0], embed_dim=d, num_layers=num_layers,
      num_heads=n, num_kv_heads=k, head_dim=h, query_pre_attn_scalar=h,
      hidden_dim=_shape_of(source, f"{layer0}mlp/linear", 2)[0])


def _shape_of(source: FlatSource, name: str, ndim: int) -> tuple[int, ...]:
  if name not in source.names():
    raise ValueError(f"{source.description}: missing tensor {name!r}; not an official Gemma "
                     "checkpoint?")
  shape = source.shape(name)
  if len(shape) != ndim:
    raise ValueError(f"{source.description}: tensor {name!r} has shape {list(shape)}, "
                     f"expected {ndim} dims")
  return shape


def read_official(path: str | os.PathLike, preset: str | None = None,
                  param_dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(config, pure param dict) of an official orbax checkpoint."""
  source = FlatSource(load_flat(path), str(path))
  found = config_from_shapes(source, Path(path).name)
  cfg = configs.choose(found, preset, str(path), compare=configs.shapes)
  cfg = cfg.replace(param_dtype=param_dtype)
  gating = source.shape(LAYER.format(i=0) + "mlp/gating_einsum") if (
      LAYER.format(i=0) + "mlp/gating_einsum" in source.names()) else None
  # [2, F, D] or [2, D, F] varies by release; when F == D the generation decides.
  transposed = None if gating is None or cfg.hidden_dim == cfg.embed_dim else (
      gating == (2, cfg.hidden_dim, cfg.embed_dim))
  fused = LAYER.format(i=0) + "attn/qkv_einsum/w" in source.names()
  return cfg, gather(cfg, rules(cfg, transposed, fused), source)


def to_official(cfg: ModelConfig, params: dict) -> dict[str, dict[str, np.ndarray]]:
  """Our pure dict in the official tree layout (module path -> {leaf: array})."""
  tensors = dict(scatter(cfg, rules(cfg), params))
  if cfg.num_heads == cfg.num_kv_heads:
    _fuse_qkv(cfg, tensors)
  tree: dict[str, dict[str, np.ndarray]] = {}
  for name, tensor in tensors.items():
    module, leaf = name.rsplit("/", 1)
    tree.setdefault(module, {})[leaf] = tensor
  return tree


def _fuse_qkv(cfg: ModelConfig, tensors: dict) -> None:
  for i in range(cfg.num_layers):
    attn = LAYER.format(i=i) + "attn/"
    q, kv = tensors.pop(attn + "q_einsum/w"), tensors.pop(attn + "kv_einsum/w")
    tensors[attn + "qkv_einsum/w"] = np.concatenate([q[None], kv])
