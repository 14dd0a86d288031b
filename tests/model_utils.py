"""Shared helpers for model tests: tiny models with every weight (norms included) random."""

import jax
import numpy as np
from flax import nnx

from gemma_jax.config import get_config
from gemma_jax.model import init_model


def random_model(name: str, seed: int = 0, **overrides):
  """A tiny preset in float32 whose norm scales are non-zero, so (1 + scale) is exercised."""
  cfg = get_config(name, dtype="float32", **overrides)
  model = init_model(cfg, seed=seed)
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return cfg, model


def random_tokens(cfg, shape, seed=0) -> np.ndarray:
  # Ids from 4 up: avoid PAD/EOS/BOS/UNK so every token is ordinary text.
  return np.random.default_rng(seed).integers(4, cfg.vocab_size, size=shape).astype(np.int32)
