"""Shared helpers for model tests: tiny models with every weight (norms included) random."""

import jax
import jax.numpy as jnp
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


@nnx.jit
def logits_of(model, tokens):
  return model(tokens)


def greedy_reference(model, prompt: list[int], steps: int, width: int = 12) -> list[int]:
  """Greedy continuation by full forward passes over a fixed-width row (causal: the padding
  after the real tokens changes nothing before it), so one compilation serves every step."""
  ids = list(prompt)
  for _ in range(steps):
    row = np.zeros((1, width), np.int32)
    row[0, :len(ids)] = ids
    ids.append(int(np.argmax(logits_of(model, jnp.asarray(row))[0, len(ids) - 1])))
  return ids[len(prompt):]
