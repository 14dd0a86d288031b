"""Gemma decoder modules and the functional helpers used at jit boundaries."""

from gemma_jax.model.attention import Attention, attention_mask, dot_product_attention
from gemma_jax.model.cache import CACHE_AXES, KVCache, init_cache
from gemma_jax.model.layers import FeedForward, RMSNorm, apply_rope, rms_norm, softcap
from gemma_jax.model.params import (abstract_model, init_model, param_axes, param_count,
                                    param_count_breakdown)
from gemma_jax.model.transformer import Block, Embedder, Transformer

__all__ = [
    "Attention", "Block", "CACHE_AXES", "Embedder", "FeedForward", "KVCache", "RMSNorm",
    "Transformer", "abstract_model", "apply_rope", "attention_mask", "dot_product_attention",
    "init_cache", "init_model", "param_axes", "param_count", "param_count_breakdown",
    "rms_norm", "softcap",
]
