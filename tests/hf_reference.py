"""Test-only bridge to Hugging Face transformers' Gemma, Gemma2 and Gemma3 (torch, CPU).

Builds the HF model that matches a ModelConfig and copies our weights into it, so logits can
be compared with an implementation written independently of ours.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

from gemma_jax.config import ModelConfig


def family(cfg: ModelConfig) -> int:
  if cfg.use_qk_norm:
    return 3
  return 2 if cfg.use_post_attn_norm else 1


def hf_config(cfg: ModelConfig):
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=True)
  layer_types = ["sliding_attention" if k == "local" else "full_attention"
                 for k in cfg.layer_kinds()]
  fam = family(cfg)
  if fam == 1:
    assert cfg.query_pre_attn_scalar == cfg.head_dim  # HF Gemma 1 scales by head_dim ** -0.5
    return transformers.GemmaConfig(
        **common, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base_global})
  gemma23 = dict(common, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                 sliding_window=cfg.sliding_window, layer_types=layer_types,
                 attn_logit_softcapping=cfg.attn_logits_softcap,
                 final_logit_softcapping=cfg.final_logits_softcap)
  if fam == 2:
    assert cfg.rope_base_local == cfg.rope_base_global and cfg.rope_scale_global == 1
    return transformers.Gemma2Config(
        **gemma23, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base_global})
  full = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
  if cfg.rope_scale_global != 1:
    full = {"rope_type": "linear", "rope_theta": cfg.rope_base_global,
            "factor": cfg.rope_scale_global}
  return transformers.Gemma3TextConfig(**gemma23, rope_parameters={
      "full_attention": full,
      "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local}})


def hf_model_class(cfg: ModelConfig):
  return {1: transformers.GemmaForCausalLM, 2: transformers.Gemma2ForCausalLM,
          3: transformers.Gemma3ForCausalLM}[family(cfg)]


def hf_model(cfg: ModelConfig, model) -> torch.nn.Module:
  """The HF causal LM with `model`'s weights, float32, eager attention (exact soft-capping)."""
  hcfg = hf_config(cfg)
  hcfg._attn_implementation = "eager"
  hf = hf_model_class(cfg)(hcfg).float().eval()
  params = nnx.state(model, nnx.Param).to_pure_dict()
  missing, unexpected = hf.load_state_dict(_hf_state_dict(cfg, params), strict=False)
  assert not unexpected, unexpected
  assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embedding
  return hf


def _hf_state_dict(cfg: ModelConfig, params) -> dict[str, torch.Tensor]:
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  layers, attn = params["layers"], params["layers"]["attn"]
  out = {"model.embed_tokens.weight": t(params["embedder"]["input_embedding"]),
         "model.norm.weight": t(params["final_norm"]["scale"])}
  fam = family(cfg)
  norm_names = {"pre_attention_norm": "input_layernorm",
                "pre_ffw_norm": "post_attention_layernorm" if fam == 1 else "pre_feedforward_layernorm"}
  if fam > 1:
    norm_names.update(post_attention_norm="post_attention_layernorm",
                      post_ffw_norm="post_feedforward_layernorm")
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    q, kv = attn["q_einsum"]["w"][i], attn["kv_einsum"]["w"][i]
    out[p + "self_attn.q_proj.weight"] = t(np.transpose(q, (0, 2, 1)).reshape(n * h, d))
    out[p + "self_attn.k_proj.weight"] = t(np.transpose(kv[0], (0, 2, 1)).reshape(k * h, d))
    out[p + "self_attn.v_proj.weight"] = t(np.transpose(kv[1], (0, 2, 1)).reshape(k * h, d))
    out[p + "self_attn.o_proj.weight"] = t(attn["attn_vec_einsum"]["w"][i].reshape(n * h, d).T)
    gating = layers["mlp"]["gating_einsum"][i]
    out[p + "mlp.gate_proj.weight"] = t(gating[0].T)
    out[p + "mlp.up_proj.weight"] = t(gating[1].T)
    out[p + "mlp.down_proj.weight"] = t(layers["mlp"]["linear"][i].T)
    for ours, theirs in norm_names.items():
      out[p + theirs + ".weight"] = t(layers[ours]["scale"][i])
    if cfg.use_qk_norm:
      out[p + "self_attn.q_norm.weight"] = t(attn["query_norm"]["scale"][i])
      out[p + "self_attn.k_norm.weight"] = t(attn["key_norm"]["scale"][i])
  return out


def hf_logits(hf, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
  """Logits [B, T, V] for unpadded rows."""
  with torch.no_grad():
    kwargs = {} if positions is None else {"position_ids": torch.from_numpy(positions).long()}
    return hf(input_ids=torch.from_numpy(tokens).long(), use_cache=False, **kwargs).logits.numpy()
