"""GGUF files (llama.cpp) of Gemma 1, 2 and 3: metadata -> ModelConfig, tensors -> float32.

Every tensor is dequantized to float32 with the `gguf` package (every type it implements).
Norm weights are stored as (1 + w) and converted back. What GGUF metadata leaves out follows
llama.cpp: Gemma 3 local layers use RoPE base 10k and five local layers precede each global
one, and the 27B models scale queries by (embed_dim / num_heads) ** -1/2.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from gemma_jax.config import ModelConfig
from gemma_jax.convert import configs, torch_layout
from gemma_jax.convert.gguf_vocab import sentencepiece_model
from gemma_jax.convert.layout import gather

ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_ROWS_PER_BLOCK = 4096


class GGUFSource:
  """The tensors of a GGUF file, memory-mapped and dequantized one at a time."""

  def __init__(self, tensors: list, description: str):
    self.description = description
    self._tensors = {t.name: t for t in tensors}

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(self._tensors[name].shape))  # GGML lists dims inner first

  def get(self, name: str) -> np.ndarray:
    """float32 values; dequantized in row blocks, so the embedding needs no float32 temporaries."""
    tensor, shape = self._tensors[name], self.shape(name)
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])  # one row of shape[-1] values each
    out = np.empty((rows.shape[0], shape[-1]), np.float32)
    for start in range(0, rows.shape[0], _ROWS_PER_BLOCK):
      block = rows[start:start + _ROWS_PER_BLOCK]
      try:
        out[start:start + len(block)] = gguf.quants.dequantize(block, tensor.tensor_type)
      except NotImplementedError as e:
        raise ValueError(f"{self.description}: tensor {name!r} is {tensor.tensor_type.name}, "
                         "which the gguf package cannot dequantize") from e
    return out.reshape(shape)


class Metadata:
  """Typed access to a GGUF file's key-value fields."""

  def __init__(self, fields: dict, description: str):
    self.fields, self.description = fields, description

  def get(self, key: str, default=None):
    field = self.fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str):
    value = self.get(key)
    if value is None:
      raise ValueError(f"{self.description}: metadata key {key!r} is missing")
    return value


def _float(x: float | None) -> float | None:
  """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
  return None if x is None else float(f"{x:.7g}")


def config_from_gguf(meta: Metadata, vocab_size: int, name: str) -> ModelConfig:
  arch = meta.require("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{meta.description}: general.architecture is {arch!r}; expected one of "
                     f"{ARCHITECTURES}")
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  need = lambda key: meta.require(f"{arch}.{key}")
  embed_dim, num_heads = need("embedding_length"), need("attention.head_count")
  head_dim = get("attention.key_length", embed_dim // num_heads)
  num_layers = need("block_count")
  rope_base = _float(get("rope.freq_base", 10_000.0))
  fields = dict(
      name=name, vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers,
      num_heads=num_heads, num_kv_heads=get("attention.head_count_kv", num_heads),
      head_dim=head_dim, hidden_dim=need("feed_forward_length"),
      max_seq_len=need("context_length"),
      norm_eps=_float(need("attention.layer_norm_rms_epsilon")),
      rope_base_global=rope_base, rope_base_local=rope_base,
      query_pre_attn_scalar=_query_pre_attn_scalar(arch, num_layers, embed_dim, num_heads,
                                                   head_dim))
  if arch == "gemma":
    return ModelConfig(**fields)
  fields.update(sliding_window=need("attention.sliding_window"), use_post_attn_norm=True,
                use_post_ffw_norm=True)
  if arch == "gemma2":
    return ModelConfig(**fields, attention_pattern=("local", "global"),
                       attn_logits_softcap=_float(get("attn_logit_softcapping", 50.0)),
                       final_logits_softcap=_float(get("final_logit_softcapping", 30.0)))
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise ValueError(f"{meta.description}: {arch}.rope.scaling.type {scaling!r} is not supported")
  fields.update(
      use_qk_norm=True,
      attention_pattern=_gemma3_pattern(get("attention.sliding_window_pattern", 6)),
      rope_base_local=_float(get("rope.freq_base_swa", 10_000.0)),
      rope_scale_global=_float(get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0)
  return ModelConfig(**fields)


def _query_pre_attn_scalar(arch, num_layers, embed_dim, num_heads, head_dim) -> float:
  """GGUF does not store it; llama.cpp keys the exception on the 27B models' depth."""
  if _LLAMA_CPP_27B_LAYERS.get(arch) == num_layers:
    return embed_dim // num_heads
  return head_dim


def _gemma3_pattern(pattern) -> tuple[str, ...]:
  """llama.cpp stores the period (every n-th layer global) or a per-layer is-sliding list."""
  if isinstance(pattern, int):
    return ("local",) * (pattern - 1) + ("global",)
  kinds = ["local" if sliding else "global" for sliding in pattern]
  period = next(p for p in range(1, len(kinds) + 1)
                if all(k == kinds[i % p] for i, k in enumerate(kinds)))
  return tuple(kinds[:period])


def read_gguf(path: str | os.PathLike, preset: str | None = None,
              param_dtype: str = "float32") -> tuple[ModelConfig, dict, bytes]:
  """(config, pure param dict, SentencePiece model bytes) of a Gemma GGUF file."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: GGUF file not found")
  reader = open_gguf(path)
  meta, source = Metadata(reader.fields, str(path)), GGUFSource(reader.tensors, str(path))
  del reader
  embed = "token_embd.weight"
  if embed not in source.names():
    raise ValueError(f"{path}: missing tensor {embed!r}")
  found = config_from_gguf(meta, source.shape(embed)[0], path.stem)
  tokenizer = sentencepiece_model(meta)
  del meta  # the reader keeps several Python objects per vocabulary entry: ~0.7 GB for Gemma 3
  cfg = configs.choose(found, preset, str(path)).replace(param_dtype=param_dtype)
  rules = torch_layout.rules(cfg, torch_layout.gguf_names(cfg), norm_offset=1.0)
  return cfg, gather(cfg, rules, source), tokenizer


def open_gguf(path: Path) -> gguf.GGUFReader:
  """A reader of GGUF file `path`, after checking what the gguf package assumes: the magic,
  a version it reads, metadata that parses and tensors that lie inside the file. Each failure
  is a ValueError naming the file and what is wrong."""
  with open(path, "rb") as f:
    head = f.read(8)
  if len(head) < 8 or head[:4] != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
  version = int.from_bytes(head[4:], "little")
  supported = gguf.gguf_reader.READER_SUPPORTED_VERSIONS
  if version not in supported:
    raise ValueError(f"{path}: GGUF version {version}; the gguf package reads versions "
                     f"{list(supported)}")
  try:
    return _CheckedReader(path)
  except _Truncated as e:
    raise ValueError(f"{path}: truncated or damaged: {e}") from None
  except Exception as e:  # noqa: BLE001 -- the reader's struct/numpy errors on damaged metadata
    raise ValueError(f"{path}: damaged GGUF metadata or tensor table ({type(e).__name__}: "
                     f"{e})") from None


class _Truncated(ValueError):
  pass


class _CheckedReader(gguf.GGUFReader):
  """GGUFReader that checks every tensor's extent before mapping it (the package would fail
  with a reshape error that names neither the tensor nor the file)."""

  def _build_tensors(self, start_offs: int, fields: list) -> None:
    size = len(self.data)
    for field in fields:
      _, name, _, dims, raw_type, offset = field.parts
      kind = gguf.GGMLQuantizationType(int(raw_type[0]))
      block, type_size = gguf.GGML_QUANT_SIZES[kind]
      start = int(start_offs + offset[0])
      end = start + int(np.prod(dims)) * type_size // block
      if end > size:
        raise _Truncated(f"tensor {bytes(name).decode(errors='replace')!r} "
                         f"({kind.name} {tuple(int(d) for d in reversed(dims))}) needs bytes "
                         f"{start:,} to {end:,}, but the file has {size:,}")
    super()._build_tensors(start_offs, fields)
