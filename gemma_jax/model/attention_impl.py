"""Fused kernels for a sequence attending to itself: TPU splash attention and GPU cuDNN.

`ModelConfig.attention_impl` picks the implementation of uncached self-attention (training,
scoring, a prefill without a cache); attention over a KV cache always runs the XLA einsums.
  xla     attention.causal_attention: the reference, any backend and shape.
  splash  the Pallas TPU splash-attention kernels shipped with jax: causal or sliding-window
          mask, soft-cap, segment ids, MQA/GQA, never materialising [T, S] logits.
  cudnn   jax.nn.dot_product_attention(implementation="cudnn") (GPU flash attention). cuDNN
          has no logit soft-cap, so Gemma 2 layers run xla instead (logged once).
  auto    splash on TPU, cudnn on GPU, xla elsewhere, and xla whenever the shape does not
          tile (auto never fails).

Both kernels take the mask as a compile-time constant, so the sliding window must be static:
transformer.py then scans over one period of the attention pattern (one local/global group
per scan step), making each layer's kind known while tracing. Both build causality and the
window from token indices where the xla path reads positions: they agree while positions
increase by one along each segment, as they do in packed and padded rows.

Under a mesh the kernels run inside shard_map over the batch and head axes that the rule
table (gemma_jax.sharding) gives q, k and v; each device attends its own rows and heads.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gemma_jax.config import ModelConfig
from gemma_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)

# Splash tiles: a multiple of the TPU's 128 lanes; the largest of these dividing T is used.
SPLASH_BLOCKS = (512, 256, 128)
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
ROWS_AXES = ("batch", "length")


def platform() -> str:
  """The platform the current computation targets: the devices of the mesh set with
  jax.set_mesh (an AOT compile for a TPU topology from a CPU host says 'tpu'), else the
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return jax.default_backend() if device is None else device.platform


def splash_block(seq_len: int) -> int | None:
  return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def problem(cfg: ModelConfig, seq_len: int, target: str) -> str | None:
  """Why cfg.attention_impl cannot run sequences of seq_len on `target` (None: it can).

  The message names the key and the fix; start-up validation and tracing both ask here.
  """
  impl = cfg.attention_impl
  if impl == "splash":
    if target != "tpu" and not cfg.attention_interpret:
      return (f"model.attention_impl='splash' is a TPU kernel and this job runs on {target}: "
              "use 'xla' or 'auto', or set model.attention_interpret=True to run it in "
              "Pallas interpret mode (slow; for tests)")
    if splash_block(seq_len) is None:
      return (f"model.attention_impl='splash' tiles the sequence in blocks of "
              f"{SPLASH_BLOCKS[-1]} tokens and the sequence length {seq_len} is not a "
              f"multiple of {SPLASH_BLOCKS[-1]}: pad it to one (e.g. "
              f"{-(-seq_len // 128) * 128}) or use model.attention_impl='xla' or 'auto'")
  if impl == "cudnn" and target != "gpu":
    return (f"model.attention_impl='cudnn' needs an NVIDIA GPU and this job runs on {target}: "
            "use 'xla' or 'auto'")
  return None


def resolve(cfg: ModelConfig, seq_len: int, target: str | None = None) -> str:
  """The implementation that runs: 'xla', 'splash' or 'cudnn'. Raises ValueError (the
  `problem` message) for an explicit choice that cannot run."""
  target = target or platform()
  impl = cfg.attention_impl
  if impl == "auto":
    impl = {"tpu": "splash", "gpu": "cudnn"}.get(target, "xla")
    if problem(cfg.replace(attention_impl=impl), seq_len, target):
      impl = "xla"
  elif why := problem(cfg, seq_len, target):
    raise ValueError(why)
  if impl == "cudnn" and cfg.attn_logits_softcap is not None:
    _log_softcap_fallback()
    return "xla"
  return impl


def needs_static_window(cfg: ModelConfig, seq_len: int) -> bool:
  """Whether the layers must be traced with a static sliding window (a fused kernel runs)."""
  return resolve(cfg, seq_len) != "xla"


def self_attention(impl: str, q, k, v, segment_ids, *, window: int | None, softcap,
                   interpret: bool = False):
  """q [B,T,N,H] (scaled), k/v [B,T,K,H], segment_ids [B,T] -> [B,T,N,H] by `impl`
  ('splash' or 'cudnn', from `resolve`); window: static sliding window, None = global."""
  run = _splash if impl == "splash" else _cudnn
  return _sharded(functools.partial(run, window=window, softcap=softcap, interpret=interpret),
                  q, k, v, segment_ids)


@functools.cache
def _log_softcap_fallback() -> None:
  log.warning("attention_impl='cudnn': cuDNN has no attention-logit soft-cap; the "
              "soft-capped layers run the xla implementation")


def _sharded(run, q, k, v, segment_ids):
  """run(q, k, v, segment_ids) on each device's rows and heads under the current mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q, k, v, segment_ids)
  q_spec = logical_to_spec(Q_AXES, q.shape, mesh)
  kv_spec = logical_to_spec(KV_AXES, k.shape, mesh)
  if q_spec[2] is not None and kv_spec[2] is None and k.shape[2] > 1:
    # Query heads split but the kv heads cannot be: give each query head its own kv head,
    # so every device's query heads find theirs among its local ones.
    k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))
    kv_spec = q_spec
  rows = PartitionSpec(q_spec[0], None)
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _splash(q, k, v, segment_ids, *, window, softcap, interpret):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  t, n, kv_heads = q.shape[1], q.shape[2], k.shape[2]
  kernel = _splash_kernel(t, n, kv_heads == 1, window, softcap, interpret)
  heads_first = lambda a: jnp.swapaxes(a, 0, 1)  # [T, N, H] -> [N, T, H]

  def one_row(q, k, v, ids):
    if kv_heads == 1:
      k, v = k[:, 0], v[:, 0]  # MQA kernel: k, v [T, H]
    else:
      k, v = heads_first(k), heads_first(v)
    return heads_first(kernel(heads_first(q), k, v, splash.SegmentIds(q=ids, kv=ids)))

  return jax.vmap(one_row)(q, k, v, segment_ids.astype(jnp.int32))


def _splash_kernel(t: int, heads: int, mqa: bool, window: int | None, softcap, interpret):
  """The kernel for one length, number of local heads and mask (whose block structure is
  computed on the host while tracing; not cached, as it holds arrays of the trace)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  if window is None or window >= t:
    mask = splash.CausalMask((t, t))
  else:  # q - k < window  <=>  k in [q - (window - 1), q]
    mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  b = splash_block(t)
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                             block_kv_dq=b)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  return make(splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
              q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def _cudnn(q, k, v, segment_ids, *, window, softcap, interpret, implementation="cudnn"):
  """jax.nn.dot_product_attention with Gemma's mask; `implementation` is a parameter so the
  CPU tests can check this mapping of the layer's options with jax's own 'xla' version."""
  del softcap, interpret
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  window = None if window is None else (window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], scale=1.0, is_causal=True,
                                      local_window_size=window, implementation=implementation)

