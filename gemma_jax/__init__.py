"""gemma-jax: train and serve Google's Gemma models with JAX and Flax NNX."""

from gemma_jax.config import ModelConfig, get_config

__all__ = ["ModelConfig", "get_config"]
