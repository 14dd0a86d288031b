"""A SentencePiece model rebuilt from a GGUF file's vocabulary, so the checkpoint has a tokenizer.

llama.cpp copies Gemma's SentencePiece pieces, scores and piece types into
tokenizer.ggml.{tokens,scores,token_type}; its token types number like SentencePiece's
(NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6). Gemma's model is a BPE
model (scores rank the merges) with byte fallback, the identity normalizer and no dummy prefix,
so the rebuilt proto encodes as the original did. Control pieces such as <start_of_turn> keep
their CONTROL type; gemma_jax.tokenizer.Tokenizer encodes them written in text as single ids.

llama.cpp stores USER_DEFINED pieces with raw spaces (its tokenizer matches them on the raw
text), but SentencePiece matches them on the escaped text, where a space is U+2581. Gemma's
whitespace runs ("  " up to 31 spaces) are such pieces: left raw they never match, and indented
code falls apart into single spaces. They get their escaped spelling back here.

A BPE model's encoding reads no TrainerSpec splitting field (split_by_whitespace, split_digits,
...): those govern training only, so they are left at their defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

if TYPE_CHECKING:
  from gemma_jax.convert.gguf_file import Metadata

_BYTE = spm_pb2.ModelProto.SentencePiece.BYTE
_USER_DEFINED = spm_pb2.ModelProto.SentencePiece.USER_DEFINED
_SPACE = "\u2581"  # SentencePiece's escaped space
_SPECIAL_IDS = {"unk": ("unknown_token_id", 3), "bos": ("bos_token_id", 2),
                "eos": ("eos_token_id", 1), "pad": ("padding_token_id", 0)}


def sentencepiece_model(meta: Metadata) -> bytes:
  """The serialized SentencePiece ModelProto of a GGUF file's `llama` (SentencePiece) vocab."""
  kind = meta.require("tokenizer.ggml.model")
  if kind != "llama":
    raise ValueError(f"{meta.description}: tokenizer.ggml.model is {kind!r}; Gemma's "
                     "SentencePiece vocabulary is stored as 'llama'")
  tokens = meta.require("tokenizer.ggml.tokens")
  scores = meta.require("tokenizer.ggml.scores")
  types = meta.require("tokenizer.ggml.token_type")
  if not len(tokens) == len(scores) == len(types):
    raise ValueError(f"{meta.description}: {len(tokens)} tokens, {len(scores)} scores and "
                     f"{len(types)} token types")
  model = spm_pb2.ModelProto()
  for piece, score, kind in zip(tokens, scores, types):
    model.pieces.add(piece=_escaped(piece) if kind == _USER_DEFINED else piece, score=score,
                     type=kind)
  trainer = model.trainer_spec
  trainer.model_type = spm_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = _BYTE in types
  for name, (key, default) in _SPECIAL_IDS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}", default)
    setattr(trainer, f"{name}_id", token_id)
    setattr(trainer, f"{name}_piece", tokens[token_id])
  normalizer = model.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return model.SerializeToString()


def _escaped(piece: str) -> str:
  """A user-defined piece as SentencePiece spells it: spaces as U+2581, as the text is escaped."""
  return piece.replace(" ", _SPACE)
