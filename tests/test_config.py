"""Presets: parameter counts against the published ones and an independent HF count."""

import pytest
import torch

from gemma_jax.config import OFFICIAL_PRESETS, ModelConfig, get_config
from gemma_jax.model import param_count, param_count_breakdown
from hf_reference import hf_config, hf_model_class

# Published totals (model cards / reference configs; Gemma 3 = text tower only).
OFFICIAL_COUNTS = {
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_099_328,
    "gemma3_12b": 11_765_788_416,
    "gemma3_27b": 27_009_002_240,
}


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_param_count_matches_official(name):
  assert param_count(get_config(name)) == OFFICIAL_COUNTS[name]


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_param_count_matches_hf_architecture(name):
  """HF's own module tree for the same config (built on the meta device, no memory)."""
  with torch.device("meta"):
    hf = hf_model_class(get_config(name))(hf_config(get_config(name)))
  hf_count = sum(p.numel() for p in hf.parameters())  # tied lm_head is counted once
  assert param_count(get_config(name)) == hf_count


@pytest.mark.parametrize("name", ["gemma_2b", "gemma2_9b"])
def test_flax_vocab_variant_adds_padding_rows(name):
  base, flax = get_config(name), get_config(f"{name}_flax")
  assert flax.vocab_size == 256_128
  assert param_count(flax) - param_count(base) == 128 * base.embed_dim


def test_breakdown_adds_up():
  cfg = get_config("gemma3_1b")
  b = param_count_breakdown(cfg)
  assert b["embedding"] == cfg.vocab_size * cfg.embed_dim
  assert b["total"] == b["embedding"] + b["per_layer"] * cfg.num_layers + b["final_norm"]


def test_layer_patterns():
  assert get_config("gemma2_9b").layer_kinds()[:4] == ("local", "global", "local", "global")
  kinds = get_config("gemma3_12b").layer_kinds()
  assert [i for i, k in enumerate(kinds) if k == "global"] == [5, 11, 17, 23, 29, 35, 41, 47]
  assert set(get_config("gemma_7b").layer_kinds()) == {"global"}


@pytest.mark.parametrize("overrides,message", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 is not a multiple of num_kv_heads=4"),
    (dict(sliding_window=None), "local layers need sliding_window"),
    (dict(remat_policy="some"), "remat_policy='some'"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(embed_dim=0), "embed_dim must be a positive int"),
    (dict(attention_pattern=("sliding",)), "attention_pattern"),
])
def test_bad_config_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    get_config("tiny_gemma3", **overrides)


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown model preset 'gemma4'"):
    get_config("gemma4")
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    get_config("gemma_2b", num_layer=3)
  assert isinstance(get_config("gemma_2b", num_layers=3), ModelConfig)
