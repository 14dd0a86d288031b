"""ModelConfig: every architectural difference in the Gemma family is a field here.

Presets carry the numbers of the official model cards / reference configs. Gemma 1 and 2
presets use the 256,000-token vocabulary of the published Hugging Face checkpoints; the
official Flax checkpoints pad it to 256,128 (`with_vocab(cfg, 256_128)` or the
`*_flax` preset names). Gemma 3 uses 262,144 tokens in both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from gemma_jax.remat import POLICIES as REMAT_POLICIES

AttentionKind = Literal["global", "local"]

GEMMA1_FLAX_VOCAB = 256_128
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one Gemma decoder."""

  name: str
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  hidden_dim: int  # MLP width (per gate)
  query_pre_attn_scalar: float  # queries are scaled by its -1/2 power
  # Layer i uses attention_pattern[i % len(attention_pattern)].
  attention_pattern: tuple[AttentionKind, ...] = ("global",)
  sliding_window: int | None = None  # keys with q_pos - k_pos < window are visible
  attn_logits_softcap: float | None = None
  final_logits_softcap: float | None = None
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  use_qk_norm: bool = False
  rope_base_global: float = 10_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0  # positions divided by this on global layers (linear scaling)
  norm_eps: float = 1e-6
  max_seq_len: int = 8192
  param_dtype: str = "float32"
  dtype: str = "bfloat16"  # compute dtype; norms, softmax, softcaps and logits stay float32
  # Rematerialisation of each scanned block, one of gemma_jax.remat.POLICIES.
  remat_policy: str = "none"
  # Run the layers with lax.scan (compile time independent of depth) or as a Python loop,
  # which skips stacking every layer's activations for the backward pass: about 5% faster
  # training of small models on XLA:CPU (benchmarks/RESULTS.md), slower to compile.
  scan_layers: bool = True
  # Attention of a sequence to itself (training, scoring, prefill without a cache): "xla"
  # (plain einsums, the reference), "splash" (Pallas TPU kernel), "cudnn" (GPU flash
  # attention) or "auto" (by backend: TPU splash, GPU cudnn, else xla). See
  # gemma_jax/model/attention_impl.py. attention_interpret runs the Pallas kernel in
  # interpret mode, on any backend (slow: for tests).
  attention_impl: str = "auto"
  attention_interpret: bool = False

  def __post_init__(self):
    _check_positive(self, "vocab_size", "embed_dim", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "hidden_dim", "max_seq_len")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig {self.name!r}: num_heads={self.num_heads} is not a "
                       f"multiple of num_kv_heads={self.num_kv_heads}")
    bad = [k for k in self.attention_pattern if k not in ("global", "local")]
    if not self.attention_pattern or bad:
      raise ValueError(f"ModelConfig {self.name!r}: attention_pattern must be a non-empty tuple "
                       f"of 'global'/'local', got {self.attention_pattern!r}")
    if "local" in self.attention_pattern and not self.sliding_window:
      raise ValueError(f"ModelConfig {self.name!r}: local layers need sliding_window > 0")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig {self.name!r}: remat_policy={self.remat_policy!r}; "
                       f"choose one of {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig {self.name!r}: attention_impl={self.attention_impl!r}; "
                       f"choose one of {ATTENTION_IMPLS}")
    for key in ("param_dtype", "dtype"):
      if getattr(self, key) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ModelConfig {self.name!r}: {key}={getattr(self, key)!r}; "
                         "use 'float32', 'bfloat16' or 'float16'")

  def layer_kinds(self) -> tuple[AttentionKind, ...]:
    """Attention kind of every layer, in order."""
    p = self.attention_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.embed_dim)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)



# ModelConfig fields that change numerics or speed only, never the parameters: a workdir may
# be resumed, and a model directory loaded, with other values.
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "max_seq_len",
                   "attention_impl", "attention_interpret")


def _check_positive(cfg: ModelConfig, *keys: str) -> None:
  for key in keys:
    value = getattr(cfg, key)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"ModelConfig {cfg.name!r}: {key} must be a positive int, got {value!r}")


def _preset(name: str, family: dict, kw: dict) -> ModelConfig:
  fields = {"head_dim": 256, **family, **kw}
  fields.setdefault("query_pre_attn_scalar", fields["head_dim"])
  return ModelConfig(name=name, **fields)


def _gemma1(name, **kw) -> ModelConfig:
  return _preset(name, dict(vocab_size=256_000, max_seq_len=8192), kw)


def _gemma2(name, **kw) -> ModelConfig:
  return _preset(name, dict(
      vocab_size=256_000, attention_pattern=("local", "global"), sliding_window=4096,
      attn_logits_softcap=50.0, final_logits_softcap=30.0, use_post_attn_norm=True,
      use_post_ffw_norm=True, max_seq_len=8192), kw)


def _gemma3(name, **kw) -> ModelConfig:
  return _preset(name, dict(
      vocab_size=262_144, attention_pattern=("local",) * 5 + ("global",), sliding_window=1024,
      use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
      rope_base_global=1_000_000.0, rope_base_local=10_000.0, rope_scale_global=8.0,
      max_seq_len=131_072), kw)


_PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in [
        _gemma1("gemma_2b", embed_dim=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                hidden_dim=16_384),
        _gemma1("gemma_7b", embed_dim=3072, num_layers=28, num_heads=16, num_kv_heads=16,
                hidden_dim=24_576),
        _gemma2("gemma2_2b", embed_dim=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                hidden_dim=9216),
        _gemma2("gemma2_9b", embed_dim=3584, num_layers=42, num_heads=16, num_kv_heads=8,
                hidden_dim=14_336),
        _gemma2("gemma2_27b", embed_dim=4608, num_layers=46, num_heads=32, num_kv_heads=16,
                head_dim=128, hidden_dim=36_864, query_pre_attn_scalar=144),
        _gemma3("gemma3_270m", embed_dim=640, num_layers=18, num_heads=4, num_kv_heads=1,
                hidden_dim=2048, sliding_window=512, rope_scale_global=1.0, max_seq_len=32_768),
        _gemma3("gemma3_1b", embed_dim=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                hidden_dim=6912, sliding_window=512, rope_scale_global=1.0, max_seq_len=32_768),
        _gemma3("gemma3_4b", embed_dim=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                hidden_dim=10_240),
        _gemma3("gemma3_12b", embed_dim=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                hidden_dim=15_360),
        _gemma3("gemma3_27b", embed_dim=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                head_dim=128, hidden_dim=21_504, query_pre_attn_scalar=168),
        # Tiny test models: one per family, every feature switched on that the family has.
        _gemma1("tiny_gemma1", vocab_size=512, embed_dim=64, num_layers=2, num_heads=4,
                num_kv_heads=1, head_dim=16, hidden_dim=128, max_seq_len=256),
        _gemma2("tiny_gemma2", vocab_size=512, embed_dim=64, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=16, hidden_dim=128, sliding_window=8, max_seq_len=256),
        _gemma3("tiny_gemma3", vocab_size=512, embed_dim=64, num_layers=7, num_heads=4,
                num_kv_heads=2, head_dim=16, hidden_dim=128, sliding_window=8,
                query_pre_attn_scalar=24, rope_scale_global=8.0, max_seq_len=256),
    ]
}
# Official Flax checkpoints of Gemma 1 and 2 pad the vocabulary to 256,128 rows.
for _name in ("gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b"):
  _PRESETS[f"{_name}_flax"] = _PRESETS[_name].replace(name=f"{_name}_flax",
                                                      vocab_size=GEMMA1_FLAX_VOCAB)

OFFICIAL_PRESETS = ("gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b",
                    "gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b")
TINY_PRESETS = ("tiny_gemma1", "tiny_gemma2", "tiny_gemma3")


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with optional field overrides (e.g. dtype='float32')."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(_PRESETS)}")
  cfg = _PRESETS[name]
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} for preset {name!r}")
  return cfg.replace(**overrides) if overrides else cfg
