"""Hugging Face checkpoints: config.json <-> ModelConfig, safetensors in and out.

Reads directories saved by transformers for GemmaForCausalLM, Gemma2ForCausalLM and
Gemma3ForCausalLM (model_type gemma, gemma2, gemma3_text), and the text tower of
Gemma3ForConditionalGeneration (model_type gemma3; vision tensors are skipped). Writes the
config.json keys that transformers 4.5x and 5.x both read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gemma_jax.checkpoint import read_json
from gemma_jax.config import ModelConfig
from gemma_jax.convert import configs, torch_layout
from gemma_jax.convert.layout import gather

log = logging.getLogger(__name__)

# transformers' defaults for keys a saved config.json may leave out (it writes only the diff).
_DEFAULTS = {
    "gemma": dict(vocab_size=256_000, hidden_size=3072, intermediate_size=24_576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                  rope_theta=10_000.0),
    "gemma2": dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                   rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=131_072, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        query_pre_attn_scalar=256, sliding_window=4096,
                        attn_logit_softcapping=None, final_logit_softcapping=None,
                        sliding_window_pattern=6),
}
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}
# Gemma3ForConditionalGeneration keeps the text decoder under one of these prefixes.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")
SHARD_BYTES = 4 << 30
# With tokenizer.model beside it, transformers' GemmaTokenizer encodes as ours (BOS first).
TOKENIZER_CONFIG = dict(tokenizer_class="GemmaTokenizer", add_bos_token=True, add_eos_token=False,
                        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def text_config(hf: dict, source: str) -> dict:
  """The decoder's config with transformers' defaults filled in."""
  model_type = hf.get("model_type")
  if model_type == "gemma3":
    hf = {"model_type": "gemma3_text", **hf.get("text_config", {})}
    model_type = "gemma3_text"
  if model_type not in _DEFAULTS:
    raise ValueError(f"{source}: model_type {model_type!r} is not a Gemma text model "
                     f"(expected one of gemma, gemma2, gemma3, gemma3_text)")
  return {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or
                                      k.endswith("softcapping")}}


def config_from_hf(hf: dict, name: str, source: str) -> ModelConfig:
  """ModelConfig from a transformers config.json dict."""
  c = text_config(hf, source)
  gen = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[c["model_type"]]
  global_rope, local_rope, rope_scale = _rope(c, gen, source)
  fields = dict(
      name=name, vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
      num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
      num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
      hidden_dim=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
      norm_eps=c["rms_norm_eps"], rope_base_global=global_rope, rope_base_local=local_rope,
      rope_scale_global=rope_scale,
      query_pre_attn_scalar=c["head_dim"] if gen == 1 else c["query_pre_attn_scalar"])
  if gen > 1:
    fields.update(
        attention_pattern=_pattern(c, gen), sliding_window=c["sliding_window"],
        attn_logits_softcap=c["attn_logit_softcapping"],
        final_logits_softcap=c["final_logit_softcapping"],
        use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=gen == 3)
  return ModelConfig(**fields)


def _rope(c: dict, gen: int, source: str) -> tuple[float, float, float]:
  """(global base, local base, global linear scale) from old- or new-style rope keys."""
  params = c.get("rope_parameters") or {}
  if gen < 3:
    scaling = params if "rope_type" in params else c.get("rope_scaling") or {}
    base = float(params.get("rope_theta", c["rope_theta"]))
    _check_rope_type(scaling, ("default",), source)
    return base, base, 1.0
  full = params.get("full_attention") or dict(c.get("rope_scaling") or {},
                                              rope_theta=c["rope_theta"])
  sliding = params.get("sliding_attention") or {"rope_theta": c["rope_local_base_freq"]}
  _check_rope_type(full, ("default", "linear"), source)
  _check_rope_type(sliding, ("default",), source)
  scale = float(full.get("factor", 1.0)) if full.get("rope_type") == "linear" else 1.0
  return (float(full.get("rope_theta", c["rope_theta"])),
          float(sliding.get("rope_theta", c["rope_local_base_freq"])), scale)


def _check_rope_type(rope: dict, allowed: tuple[str, ...], source: str) -> None:
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in allowed:
    raise ValueError(f"{source}: rope_type {kind!r} is not supported here (only {allowed})")


def _pattern(c: dict, gen: int) -> tuple[str, ...]:
  if layer_types := c.get("layer_types"):
    kinds = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    period = next(p for p in range(1, len(kinds) + 1)
                  if all(k == kinds[i % p] for i, k in enumerate(kinds)))
    return tuple(kinds[:period])
  if gen == 2:
    return ("local", "global")
  period = c["sliding_window_pattern"]
  return ("local",) * (period - 1) + ("global",)


def config_to_hf(cfg: ModelConfig) -> dict:
  """transformers config.json for cfg; an error when HF's classes cannot express it."""
  gen = torch_layout.family(cfg)
  model_type = {1: "gemma", 2: "gemma2", 3: "gemma3_text"}[gen]
  out = dict(
      architectures=[_ARCHITECTURES[model_type]], model_type=model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_base_global, hidden_activation="gelu_pytorch_tanh",
      hidden_act="gelu_pytorch_tanh", attention_bias=False, tie_word_embeddings=True,
      pad_token_id=0, eos_token_id=1, bos_token_id=2, torch_dtype=cfg.param_dtype)
  problems = _inexpressible(cfg, gen)
  if problems:
    raise ValueError(f"model {cfg.name!r} cannot be exported as HF {model_type}: "
                     + "; ".join(problems))
  if gen == 1:
    return out
  out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
             attn_logit_softcapping=cfg.attn_logits_softcap,
             final_logit_softcapping=cfg.final_logits_softcap,
             layer_types=["sliding_attention" if k == "local" else "full_attention"
                          for k in cfg.layer_kinds()])
  if gen == 3:
    out.update(rope_local_base_freq=cfg.rope_base_local, rope_scaling=None if
               cfg.rope_scale_global == 1 else {"rope_type": "linear",
                                                "factor": cfg.rope_scale_global})
  return out


def _inexpressible(cfg: ModelConfig, gen: int) -> list[str]:
  checks = [(cfg.use_post_attn_norm == cfg.use_post_ffw_norm,
             "HF has both post-norms or neither"),
            (gen == 3 or cfg.rope_scale_global == 1, "RoPE scaling needs Gemma 3"),
            (gen == 3 or cfg.rope_base_local == cfg.rope_base_global,
             "separate local/global RoPE bases need Gemma 3")]
  if gen == 1:
    checks += [(cfg.query_pre_attn_scalar == cfg.head_dim,
                "HF Gemma scales queries by head_dim ** -0.5"),
               (cfg.attn_logits_softcap is None and cfg.final_logits_softcap is None,
                "HF Gemma has no soft-caps"),
               (set(cfg.attention_pattern) == {"global"}, "HF Gemma has no sliding window")]
  return [message for ok, message in checks if not ok]


class SafetensorsSource:
  """The tensors of a directory of *.safetensors files, opened lazily (text decoder only)."""

  def __init__(self, directory: Path):
    self.description = str(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"{directory}: no *.safetensors files")
    self._handles = [safe_open(f, framework="numpy") for f in files]
    self._where: dict[str, tuple[int, str]] = {}
    skipped = 0
    for k, handle in enumerate(self._handles):
      for stored in handle.keys():
        if stored.startswith(_VISION_PREFIXES):
          skipped += 1
          continue
        self._where[_text_name(stored)] = (k, stored)
    if skipped:
      log.info("%s: skipped %d vision tensors", directory, skipped)

  def names(self) -> set[str]:
    return set(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    k, stored = self._where[name]
    return tuple(self._handles[k].get_slice(stored).get_shape())

  def get(self, name: str) -> np.ndarray:
    k, stored = self._where[name]
    return self._handles[k].get_tensor(stored)


def _text_name(stored: str) -> str:
  for prefix in _TEXT_PREFIXES:
    if stored.startswith(prefix):
      return "model." + stored[len(prefix):]
  return stored.removeprefix("language_model.")  # language_model.lm_head.weight


def read_hf(directory: str | os.PathLike, preset: str | None = None,
            param_dtype: str = "float32") -> tuple[ModelConfig, dict, Path | None]:
  """(config, pure param dict, tokenizer.model path or None) of an HF model directory."""
  directory = Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: not found; is {directory} an HF model directory?")
  found = config_from_hf(read_json(config_path), directory.name, str(config_path))
  cfg = configs.choose(found, preset, str(directory)).replace(param_dtype=param_dtype)
  source = SafetensorsSource(directory)
  names = torch_layout.hf_names(cfg)
  _check_tied(source, names["embed"])
  params = gather(cfg, torch_layout.rules(cfg, names), source,
                  ignore=lambda n: n == "lm_head.weight")
  tokenizer = directory / "tokenizer.model"
  return cfg, params, tokenizer if tokenizer.is_file() else None


def _check_tied(source: SafetensorsSource, embed: str) -> None:
  """Gemma ties the output layer to the embedding; a saved copy must be that copy."""
  if "lm_head.weight" in source.names() and embed in source.names():
    if not np.array_equal(source.get("lm_head.weight"), source.get(embed)):
      raise ValueError(f"{source.description}: tensor 'lm_head.weight' differs from {embed!r}; "
                       "Gemma ties the output layer to the embedding")


def write_hf(directory: Path, cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
             shard_bytes: int = SHARD_BYTES) -> None:
  """config.json and model.safetensors (or shards and their index) into directory."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
  shards, current, size = [], {}, 0
  for name, tensor in tensors:
    if current and size + tensor.nbytes > shard_bytes:
      shards.append(_write_shard(directory, len(shards), current))
      current, size = {}, 0
    current[name], size = tensor, size + tensor.nbytes
  shards.append(_write_shard(directory, len(shards), current))
  if len(shards) == 1:
    (directory / shards[0][0]).rename(directory / "model.safetensors")
    return
  total = len(shards)
  weight_map = {}
  for k, (tmp_name, names) in enumerate(shards):
    final = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
    (directory / tmp_name).rename(directory / final)
    weight_map.update(dict.fromkeys(names, final))
  index = {"metadata": {}, "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(directory: Path, k: int, tensors: dict) -> tuple[str, list[str]]:
  name = f".shard-{k}.safetensors"  # renamed once the shard count is known
  save_file(tensors, directory / name, metadata={"format": "pt"})
  return name, list(tensors)
