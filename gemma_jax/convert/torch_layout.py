"""The [out_features, in_features] layout shared by HF safetensors and GGUF tensors.

Both store q/k/v/o and the MLP as separate 2-D matrices (GGUF's numpy view of a tensor equals
the torch weight) and differ only in names and in GGUF's (1 + w) norms. Neither permutes the
query/key rows for Gemma: llama.cpp runs Gemma's RoPE in the split-halves (NeoX) order, as HF.
"""

from __future__ import annotations

import numpy as np

from gemma_jax.config import ModelConfig
from gemma_jax.convert.layout import Rule, identity


def family(cfg: ModelConfig) -> int:
  """1, 2 or 3: the Gemma generation whose parameter set cfg has."""
  if cfg.use_qk_norm:
    return 3
  return 2 if cfg.use_post_attn_norm or cfg.use_post_ffw_norm else 1


def hf_names(cfg: ModelConfig) -> dict[str, str]:
  """Tensor name of each role in HF transformers' Gemma, Gemma2 and Gemma3 state dicts."""
  layer = "model.layers.{i}."
  names = {
      "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
      "q": layer + "self_attn.q_proj.weight", "k": layer + "self_attn.k_proj.weight",
      "v": layer + "self_attn.v_proj.weight", "o": layer + "self_attn.o_proj.weight",
      "q_norm": layer + "self_attn.q_norm.weight", "k_norm": layer + "self_attn.k_norm.weight",
      "gate": layer + "mlp.gate_proj.weight", "up": layer + "mlp.up_proj.weight",
      "down": layer + "mlp.down_proj.weight",
      "pre_attention_norm": layer + "input_layernorm.weight",
      "post_attention_norm": layer + "post_attention_layernorm.weight",
      "pre_ffw_norm": layer + "pre_feedforward_layernorm.weight",
      "post_ffw_norm": layer + "post_feedforward_layernorm.weight",
  }
  if family(cfg) == 1:  # Gemma 1 calls its pre-MLP norm post_attention_layernorm
    names["pre_ffw_norm"] = names.pop("post_attention_norm")
  return names


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
  """Tensor name of each role in llama.cpp's gemma, gemma2 and gemma3 GGUF files."""
  del cfg  # the same names in every generation
  layer = "blk.{i}."
  return {
      "embed": "token_embd.weight", "final_norm": "output_norm.weight",
      "q": layer + "attn_q.weight", "k": layer + "attn_k.weight", "v": layer + "attn_v.weight",
      "o": layer + "attn_output.weight", "q_norm": layer + "attn_q_norm.weight",
      "k_norm": layer + "attn_k_norm.weight", "gate": layer + "ffn_gate.weight",
      "up": layer + "ffn_up.weight", "down": layer + "ffn_down.weight",
      "pre_attention_norm": layer + "attn_norm.weight",
      "post_attention_norm": layer + "post_attention_norm.weight",
      "pre_ffw_norm": layer + "ffn_norm.weight", "post_ffw_norm": layer + "post_ffw_norm.weight",
  }


def rules(cfg: ModelConfig, names: dict[str, str], norm_offset: float = 0.0) -> list[Rule]:
  """Rules for every parameter of cfg; their norms are ours + norm_offset."""
  n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim, cfg.hidden_dim

  def heads_in(w, count):  # [count * h, d] -> [count, d, h]
    return w.reshape(count, h, d).transpose(0, 2, 1)

  def heads_out(w):  # [count, d, h] -> [count * h, d]
    return w.transpose(0, 2, 1).reshape(-1, d)

  out = [
      identity(("embedder", "input_embedding"), names["embed"], (cfg.vocab_size, d)),
      identity(("final_norm", "scale"), names["final_norm"], (d,), norm_offset),
      Rule(("layers", "attn", "q_einsum", "w"), (names["q"],), ((n * h, d),),
           lambda q: heads_in(q, n), lambda w: (heads_out(w),)),
      Rule(("layers", "attn", "kv_einsum", "w"), (names["k"], names["v"]), ((k * h, d),) * 2,
           lambda k_, v: np.stack([heads_in(k_, k), heads_in(v, k)]),
           lambda w: (heads_out(w[0]), heads_out(w[1]))),
      Rule(("layers", "attn", "attn_vec_einsum", "w"), (names["o"],), ((d, n * h),),
           lambda o: o.T.reshape(n, h, d), lambda w: (w.reshape(n * h, d).T,)),
      Rule(("layers", "mlp", "gating_einsum"), (names["gate"], names["up"]), ((f, d),) * 2,
           lambda g, u: np.stack([g.T, u.T]), lambda w: (w[0].T, w[1].T)),
      Rule(("layers", "mlp", "linear"), (names["down"],), ((d, f),),
           lambda x: x.T, lambda w: (w.T,)),
  ]
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  norms += ["post_attention_norm"] if cfg.use_post_attn_norm else []
  norms += ["post_ffw_norm"] if cfg.use_post_ffw_norm else []
  out += [identity(("layers", norm, "scale"), names[norm], (d,), norm_offset) for norm in norms]
  if cfg.use_qk_norm:
    out += [identity(("layers", "attn", ours, "scale"), names[theirs], (h,), norm_offset)
            for ours, theirs in (("query_norm", "q_norm"), ("key_norm", "k_norm"))]
  return out
