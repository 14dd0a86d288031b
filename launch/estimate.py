"""Formula estimates of a train step's per-chip memory and time, before compiling it.

launch.plan uses them only to prune candidates that cannot fit and to order the rest, so
that few are compiled; what it reports and chooses comes from the compiled programs
(launch.aot). Both are estimates, labelled so wherever they are shown.

Memory per chip = the sharded train state (weights, optimizer moments, gradients; exact,
from the run layout) + one layer's weights gathered twice over (this layer and the next,
prefetched) + the activations the remat policy keeps for all layers + one layer's full
set, recomputed in the backward + the loss's working set. XLA attention keeps its float32
logits (and, without remat, the probabilities); a fused kernel (splash) keeps only one
float32 logsumexp per query and head. Against compiled peaks it is within a factor 1.6
(tests/test_plan.py), well enough to prune.
Time per chip = model FLOPs plus what the policy recomputes, at the chip's peak, plus the
ZeRO-3 traffic of launch.audit (repeated per microbatch) and tensor-parallel activation
all-reduces, over the ICI bandwidth: no overlap assumed, as launch.aot's estimate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gemma_jax import flops
from gemma_jax.config import ModelConfig
from gemma_jax.losses import VOCAB_TILE
from gemma_jax.model import attention_impl
from gemma_jax.model.attention import MIN_QUERY_CHUNK, QUERY_CHUNKS
from gemma_jax.train_state import RunLayout
from launch import audit
from launch.compile_step import state_bytes_per_chip


@dataclasses.dataclass(frozen=True)
class Shape:
  """What a candidate fixes about one chip's work: the model, its tokens, the mesh."""
  cfg: ModelConfig
  seq_len: int
  rows_per_chip: int  # sequences per batch shard per microbatch
  microbatches: int
  tensor: int
  loss_chunk_tokens: int  # tokens per chip per loss chunk

  @property
  def tokens(self) -> int:
    return self.rows_per_chip * self.seq_len


def _attention_keys(cfg: ModelConfig, seq_len: int, kind: str) -> float:
  """Keys each query's logits row spans as computed (query chunks skip 3/8 when causal)."""
  keys = seq_len * ((QUERY_CHUNKS + 1) / (2 * QUERY_CHUNKS)
                    if seq_len % QUERY_CHUNKS == 0 and seq_len >= QUERY_CHUNKS * MIN_QUERY_CHUNK
                    else 1.0)
  return min(keys, cfg.sliding_window + seq_len / QUERY_CHUNKS) if kind == "local" else keys


def tpu_attention(cfg: ModelConfig, seq_len: int) -> str | None:
  """The attention a TPU step of seq_len tokens runs: 'xla' or 'splash' ('auto' resolved);
  None when TPU cannot run cfg's choice (validation says why)."""
  try:
    return attention_impl.resolve(cfg, seq_len, "tpu")
  except ValueError:
    return None


def layer_activation_bytes(s: Shape, policy: str, kind: str = "global") -> float:
  """Bytes one layer keeps for the backward under `policy` (the block input excluded)."""
  cfg, t, tp = s.cfg, s.tokens, s.tensor
  c = np.dtype(cfg.dtype).itemsize
  d, f, h = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim
  qkv = t * (cfg.num_heads + 2 * cfg.num_kv_heads) * h / tp * c
  if policy in ("full", "offload_qkv_proj"):
    return 0.0
  if policy == "save_qkv_proj":
    return qkv
  fused = tpu_attention(cfg, s.seq_len) == "splash"  # no [queries, keys] logits in HBM
  keys = 1 if fused else _attention_keys(cfg, s.seq_len, kind)
  logits = t * cfg.num_heads / tp * keys * 4  # float32 (fused: the logsumexp)
  dots = qkv + logits + t * (cfg.num_heads * h / tp + 2 * d + 2 * f / tp) * c
  if policy in ("dots", "dots_with_no_batch_dims"):
    return dots - (logits if policy == "dots_with_no_batch_dims" else 0.0)
  # "none": every intermediate: the probabilities, norms, GeLU and its product too.
  probabilities = 0 if fused else logits / 2
  return dots + probabilities + t * (6 * d + 2 * f / tp) * c


def _layer_weight_bytes(cfg: ModelConfig, tensor: int) -> float:
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_dim
  return (2 * d * n * h + 2 * d * k * h + 3 * d * f) / tensor * np.dtype(cfg.dtype).itemsize


def _loss_bytes(s: Shape) -> float:
  """A vocabulary tile gathered (compute dtype) with its float32 gradient, its logits for
  one chunk of tokens (values, probabilities, their gradient), and the float32 features
  with their gradient."""
  cfg = s.cfg
  tile = min(VOCAB_TILE, cfg.vocab_size // s.tensor)
  return (tile * cfg.embed_dim * (np.dtype(cfg.dtype).itemsize + 4)
          + 3 * s.loss_chunk_tokens * tile * 4 + 2 * s.tokens * cfg.embed_dim * 4)


def memory_bytes(layout: RunLayout, s: Shape, policy: str) -> float:
  """Estimated peak bytes per chip of a train step (see the module docstring)."""
  cfg = s.cfg
  state = state_bytes_per_chip(layout.abstract)
  grads = state["params"]  # trainable: a float32 gradient per parameter
  state = sum(state.values())
  kinds = cfg.layer_kinds()
  kept = sum(layer_activation_bytes(s, policy, k) for k in kinds)
  residuals = len(kinds) * s.tokens * cfg.embed_dim * np.dtype(cfg.dtype).itemsize
  recompute = max(layer_activation_bytes(s, "none", k) for k in set(kinds))
  return (state + grads + 2 * _layer_weight_bytes(cfg, s.tensor) + kept + residuals
          + recompute + _loss_bytes(s))


def recompute_fraction(cfg: ModelConfig, seq_len: int, policy: str) -> float:
  """Forward FLOPs the backward recomputes under `policy`, as a fraction of the train
  step's model FLOPs (3 x forward)."""
  if policy in ("none", "dots", "dots_with_no_batch_dims"):
    return 0.0
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  logits = 2 * cfg.vocab_size * d
  layers = flops.forward_flops_per_token(cfg, seq_len) - logits
  if policy != "full":  # the q/k/v projections are kept (on chip or on the host)
    layers -= cfg.num_layers * 2 * d * (n + 2 * k) * h
  return layers / (3 * flops.forward_flops_per_token(cfg, seq_len))


def step_seconds(layout: RunLayout, s: Shape, policy: str, chips: int, peak_flops: float,
                 ici_bytes_per_s: float) -> float:
  """Estimated seconds per step (see the module docstring)."""
  cfg = s.cfg
  tokens_per_chip = s.tokens * s.microbatches
  compute = (flops.train_flops_per_token(cfg, s.seq_len) * tokens_per_chip / s.tensor
             * (1 + recompute_fraction(cfg, s.seq_len, policy)))
  zero3 = sum(audit.expected_traffic(layout).values()) * s.microbatches
  tp_traffic = 0.0
  if s.tensor > 1:  # two all-reduces of [tokens, d] per layer, forward, recompute, backward
    passes = 3 if policy == "full" else 2
    tp_traffic = (2 * passes * cfg.num_layers * tokens_per_chip * cfg.embed_dim
                  * np.dtype(cfg.dtype).itemsize * 2 * (s.tensor - 1) / s.tensor)
  return compute / peak_flops + (zero3 + tp_traffic) / ici_bytes_per_s
