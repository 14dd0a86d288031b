"""The one FLOPs count used for MFU: matmul FLOPs of a training step, per token.

Forward FLOPs per token = 2 x (matmul parameters) + attention, where matmul parameters are
the q/kv/output projections and MLP of every layer plus the tied logits table (V x D; the
embedding lookup is not a matmul), and attention is 2 x 2 x heads x head_dim x (keys visible
to the token): QK^T and probabilities x V. Keys visible are averaged over the positions of a
causal sequence of length T: (T + 1) / 2 for global layers, mean(min(t + 1, window)) for
sliding-window layers. Training = forward + backward = 3 x forward (rematerialisation is
not counted: MFU measures useful work).
"""

from __future__ import annotations

from gemma_jax.config import ModelConfig


def mean_visible_keys(seq_len: int, window: int | None) -> float:
  if window is None or window >= seq_len:
    return (seq_len + 1) / 2
  # positions 0..w-1 see t+1 keys, the rest see w
  return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward QK^T and probabilities x V of every layer, per token."""
  return sum(4 * cfg.num_heads * cfg.head_dim *
             mean_visible_keys(seq_len, cfg.sliding_window if kind == "local" else None)
             for kind in cfg.layer_kinds())


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_dim
  layer_matmul_params = d * n * h * 2 + 2 * d * k * h + 3 * d * f
  return (2 * (cfg.num_layers * layer_matmul_params + cfg.vocab_size * d)
          + attention_flops_per_token(cfg, seq_len))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 3 * forward_flops_per_token(cfg, seq_len)
