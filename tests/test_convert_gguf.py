"""GGUF import with tiny random models written the way llama.cpp lays out Gemma 1, 2 and 3."""

import logging
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from test_convert import params_of, tiny

from gemma_jax.convert import gguf_file, import_checkpoint, torch_layout
from gemma_jax.convert.configs import architecture
from gemma_jax.convert.layout import scatter
from gemma_jax.model_dir import load_model_dir
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
ARCH = {1: "gemma", 2: "gemma2", 3: "gemma3"}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> bytes:
  """A 512-piece Gemma-layout SentencePiece model (<start_of_turn>, <end_of_turn> at 4, 5)."""
  return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm") / "t", 512).read_bytes()


def llama_cpp_spelling(piece) -> str:
  """llama.cpp writes user-defined pieces with raw spaces ("pre-normalized"), others as they are."""
  user_defined = piece.type == spm_pb2.ModelProto.SentencePiece.USER_DEFINED
  return piece.piece.replace("\u2581", " ") if user_defined else piece.piece


def write_gguf(path, cfg, model, spm: bytes, qtypes=None, drop=(), arch=None) -> Path:
  """A GGUF file as llama.cpp's converter writes Gemma: its names, (1 + w) norms, metadata."""
  arch = arch or ARCH[torch_layout.family(cfg)]
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.embed_dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_freq_base(cfg.rope_base_global)
  if arch != "gemma":  # (defaults for metadata a Gemma 1 config lacks, to mislabel it)
    w.add_sliding_window(cfg.sliding_window or 4096)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logits_softcap or 50.0)
    w.add_final_logit_softcapping(cfg.final_logits_softcap or 30.0)
  if arch == "gemma3" and cfg.rope_scale_global != 1:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scale_global)
  proto = spm_pb2.ModelProto.FromString(spm)
  w.add_tokenizer_model("llama")
  w.add_token_list([llama_cpp_spelling(p) for p in proto.pieces])
  w.add_token_scores([p.score for p in proto.pieces])
  w.add_token_types([int(p.type) for p in proto.pieces])
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_space_prefix(False)
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  rules = torch_layout.rules(cfg, torch_layout.gguf_names(cfg), norm_offset=1.0)
  for name, tensor in scatter(cfg, rules, params):
    if name in drop:
      continue
    qtype = (qtypes or {}).get(name, gguf.GGMLQuantizationType.F32)
    w.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return Path(path)


@pytest.mark.parametrize("name", ["tiny_gemma1", "tiny_gemma2", "tiny_gemma3"])
def test_gguf_gives_the_model(tmp_path, spm_model, name):
  overrides = {"query_pre_attn_scalar": 16} if name == "tiny_gemma3" else {}  # not in GGUF
  cfg, model = tiny(name, **overrides)
  path = write_gguf(tmp_path / "m.gguf", cfg, model, spm_model)
  cfg2, out = import_checkpoint("gguf", path, tmp_path / "out")
  assert architecture(cfg2) == architecture(cfg)
  assert cfg2.name == (name if not overrides else "m")  # a preset only when everything matches
  # Equal parameters (so equal logits), but for the norms' float32 round trip through 1 + w.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
               params_of(load_model_dir(out)[1]), params_of(model))


def test_quantized_tensors_are_dequantized(tmp_path, spm_model, monkeypatch):
  monkeypatch.setattr(gguf_file, "_ROWS_PER_BLOCK", 7)  # blocks with a remainder
  cfg, model = tiny("tiny_gemma2")
  q = gguf.GGMLQuantizationType
  qtypes = {"token_embd.weight": q.Q8_0, "blk.1.ffn_up.weight": q.Q4_0,
            "blk.0.attn_q.weight": q.BF16, "blk.2.ffn_down.weight": q.F16}
  path = write_gguf(tmp_path / "q.gguf", cfg, model, spm_model, qtypes)
  reader = gguf.GGUFReader(path)
  stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors
            if t.name in qtypes}
  _, out = import_checkpoint("gguf", path, tmp_path / "out")
  params = params_of(load_model_dir(out)[1])
  np.testing.assert_array_equal(params["embedder"]["input_embedding"], stored["token_embd.weight"])
  np.testing.assert_array_equal(params["layers"]["mlp"]["gating_einsum"][1, 1],
                                stored["blk.1.ffn_up.weight"].T)
  np.testing.assert_array_equal(params["layers"]["mlp"]["linear"][2],
                                stored["blk.2.ffn_down.weight"].T)
  original = params_of(model)["embedder"]["input_embedding"]
  assert 0 < np.abs(stored["token_embd.weight"] - original).max() < 0.02  # really quantized


def test_rebuilt_tokenizer_encodes_like_the_original(tmp_path, spm_model):
  cfg, model = tiny("tiny_gemma3")
  _, out = import_checkpoint("gguf", write_gguf(tmp_path / "m.gguf", cfg, model, spm_model),
                             tmp_path / "out")
  ours, original = Tokenizer(out / "tokenizer.model"), Tokenizer(spm_model)
  texts = CORPUS.read_text().splitlines()[:50] + [
      "<start_of_turn>user\nHi  there\t1234 ünïcødé 🙂<end_of_turn>\n", "  leading spaces"]
  for text in texts:
    assert ours.encode(text, add_bos=True) == original.encode(text, add_bos=True), text
    assert ours.decode(ours.encode(text)) == text
  assert ours.encode("<start_of_turn>") == [ours.start_of_turn_id] == [4]
  assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)


def with_whitespace_pieces(spm: bytes) -> bytes:
  """The model with its last pieces replaced by Gemma-style user-defined ones (runs of 2-8
  spaces, of tabs, an HTML tag), so the vocabulary keeps the model's size."""
  proto = spm_pb2.ModelProto.FromString(spm)
  runs = ["\u2581" * n for n in range(2, 9)] + ["\t" * n for n in range(2, 5)] + ["<div>"]
  for slot, piece in zip(proto.pieces[-len(runs):], runs):
    slot.piece, slot.score, slot.type = piece, 0.0, spm_pb2.ModelProto.SentencePiece.USER_DEFINED
  return proto.SerializeToString()


def test_user_defined_whitespace_pieces_survive_the_gguf(tmp_path, spm_model):
  """The GGUF spells the run pieces with raw spaces; the rebuilt model must still use them."""
  spm = with_whitespace_pieces(spm_model)
  cfg, model = tiny("tiny_gemma3")
  _, out = import_checkpoint("gguf", write_gguf(tmp_path / "m.gguf", cfg, model, spm),
                             tmp_path / "out")
  ours, original = Tokenizer(out / "tokenizer.model"), Tokenizer(spm)
  texts = ["def f(x):\n    if x:\n        return x\n  pass", "a  b   c", "\t\tx = 1",
           "<div>  <div>", "  ", "x" + " " * 11 + "y", "<start_of_turn>user\n    hi<end_of_turn>"]
  for text in texts:
    assert ours.encode(text) == original.encode(text), text
    assert ours.decode(ours.encode(text)) == text
  four_spaces = original.encode("    ")
  assert len(four_spaces) == 1 and four_spaces[0] in ours.encode("\n    return")


def test_missing_tensor_is_named(tmp_path, spm_model):
  cfg, model = tiny("tiny_gemma3")
  path = write_gguf(tmp_path / "m.gguf", cfg, model, spm_model, drop=("blk.3.attn_k_norm.weight",))
  with pytest.raises(ValueError, match=r"missing tensor 'blk.3.attn_k_norm.weight' \(expected"):
    import_checkpoint("gguf", path, tmp_path / "out")


def test_wrong_family_metadata_is_refused(tmp_path, spm_model):
  cfg, model = tiny("tiny_gemma1")
  path = write_gguf(tmp_path / "m.gguf", cfg, model, spm_model, arch="gemma2")
  with pytest.raises(ValueError, match="unexpected tensor|missing tensor 'blk.0.post_ffw_norm"):
    import_checkpoint("gguf", path, tmp_path / "out")
  path = write_gguf(tmp_path / "l.gguf", cfg, model, spm_model, arch="llama")
  with pytest.raises(ValueError, match="general.architecture is 'llama'"):
    import_checkpoint("gguf", path, tmp_path / "out")


def test_undequantizable_type_is_named(tmp_path, spm_model, monkeypatch):
  cfg, model = tiny("tiny_gemma1")
  path = write_gguf(tmp_path / "m.gguf", cfg, model, spm_model)
  monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: (_ for _ in ()).throw(
      NotImplementedError(qtype)))
  with pytest.raises(ValueError, match="tensor 'token_embd.weight' is F32, which the gguf "
                                       "package cannot dequantize"):
    import_checkpoint("gguf", path, tmp_path / "out")


def test_near_preset_is_reported_and_preset_can_be_forced(tmp_path, spm_model, caplog):
  """GGUF has no query_pre_attn_scalar: tiny_gemma3's 24 reads back as head_dim (16)."""
  cfg, model = tiny("tiny_gemma3")
  path = write_gguf(tmp_path / "m.gguf", cfg, model, spm_model)
  with caplog.at_level(logging.WARNING):
    found, _ = import_checkpoint("gguf", path, tmp_path / "a")
  assert found.query_pre_attn_scalar == 16 and "pass --model tiny_gemma3" in caplog.text
  forced, _ = import_checkpoint("gguf", path, tmp_path / "b", preset="tiny_gemma3")
  assert forced.name == "tiny_gemma3" and forced.query_pre_attn_scalar == 24
