"""Tests for gemma_jax.tokenizer against tiny SentencePiece models trained on the fly."""

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
VOCAB_SIZE = 1000


def _train(tmp_path_factory, name: str, **kwargs) -> Path:
  return train_sentencepiece(CORPUS, tmp_path_factory.mktemp(name) / "tiny", VOCAB_SIZE, **kwargs)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
  return _train(tmp_path_factory, "spm")


@pytest.fixture(scope="session")
def tok(model_path) -> Tokenizer:
  return Tokenizer(model_path)


@pytest.fixture(scope="session")
def sp(model_path) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_file=str(model_path))


# --- special ids -------------------------------------------------------------


def test_gemma_special_ids(tok, sp):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == VOCAB_SIZE
  assert [sp.id_to_piece(i) for i in range(6)] == [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"
  ]
  assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)
  # The turn tokens are CONTROL pieces, which SentencePiece never emits from text.
  assert sp.is_control(4) and sp.is_control(5)
  assert 4 not in sp.encode("<start_of_turn>")


@pytest.mark.parametrize("turn_ids", [(105, 106), (106, 107), (9, 7)])
def test_turn_ids_are_looked_up_by_name(tmp_path_factory, turn_ids):
  tok = Tokenizer(_train(tmp_path_factory, "turns", turn_ids=turn_ids))
  start, end = turn_ids
  assert (tok.start_of_turn_id, tok.end_of_turn_id) == (start, end)
  ids = tok.encode_chat([{"role": "user", "content": "hi"}])
  assert ids.count(start) == 2 and ids.count(end) == 1
  assert tok.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def _proto(model_path: Path) -> sentencepiece_model_pb2.ModelProto:
  return sentencepiece_model_pb2.ModelProto.FromString(model_path.read_bytes())


def test_longest_control_piece_wins(model_path):
  # A control piece that extends "<start_of_turn>" must not be split after its prefix.
  proto = _proto(model_path)
  last = proto.pieces[-1]
  last.piece, last.type = "<start_of_turn>!", last.CONTROL
  tok = Tokenizer(proto.SerializeToString())
  assert tok.encode("<start_of_turn>!<start_of_turn>") == [VOCAB_SIZE - 1, 4]


def test_user_defined_turn_tokens(model_path, sp):
  # Turn tokens stored as USER_DEFINED (not CONTROL) pieces are still special.
  proto = _proto(model_path)
  for i in (4, 5):
    proto.pieces[i].type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  tok = Tokenizer(proto.SerializeToString())
  ids = [4, *sp.encode("user\nhi"), 5]
  assert tok.encode("<start_of_turn>user\nhi<end_of_turn>") == ids
  assert tok.decode(ids, skip_control=True) == "user\nhi"
  assert tok.decode(ids) == "<start_of_turn>user\nhi<end_of_turn>"


def test_model_without_turn_tokens(tmp_path_factory):
  path = _train(tmp_path_factory, "noturns", turn_ids=None)
  tok, sp = Tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
  for attr in ("start_of_turn_id", "end_of_turn_id"):
    with pytest.raises(ValueError, match="<start_of_turn>.*<end_of_turn>"):
      getattr(tok, attr)
  messages = [{"role": "user", "content": "hi"}]
  with pytest.raises(ValueError, match="no '<start_of_turn>' piece"):
    tok.apply_chat_template(messages)
  with pytest.raises(ValueError, match="no '<start_of_turn>' piece"):
    tok.encode_chat(messages)
  # Plain text (even the turn markup) still works, as ordinary characters.
  text = "<start_of_turn>user\nhi"
  assert tok.encode(text) == sp.encode(text)
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("turn_ids", [(3, 5), (4, 4), (4, VOCAB_SIZE)])
def test_train_rejects_bad_turn_ids(tmp_path, turn_ids):
  with pytest.raises(ValueError, match="turn_ids"):
    train_sentencepiece(CORPUS, tmp_path / "m", VOCAB_SIZE, turn_ids=turn_ids)


def _vocab(sp: spm.SentencePieceProcessor) -> list[tuple[str, float]]:
  return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]


def test_training_is_reproducible(tmp_path_factory, sp):
  # Compare vocabularies: the .model bytes also record the output path.
  again = spm.SentencePieceProcessor(model_file=str(_train(tmp_path_factory, "again")))
  assert _vocab(again) == _vocab(sp)


# --- encode / decode -----------------------------------------------------------

ROUND_TRIP = [
  "Hello world",
  "The bees dance on the comb.",
  "  leading and trailing spaces  ",
  "line one\nline two\n\n",
  "tabs\tand   runs of spaces",
  "naïve café, 日本語, emoji 😀🚀",
  "digits 3.14159 and 2024",
  "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_plain_text_matches_sentencepiece_and_round_trips(tok, sp, text):
  ids = tok.encode(text)
  assert ids == sp.encode(text)
  assert tok.decode(ids) == text


def test_unicode_uses_byte_fallback(tok, sp):
  ids = tok.encode("😀")
  assert len(ids) == 4 and all(sp.is_byte(i) for i in ids)


@pytest.mark.parametrize(
  "text",
  [
    "<start_of_turn>user\nhi<end_of_turn>",
    "Say: <start_of_turn>model\nOK <end_of_turn>\n bye",
    "<bos> x <eos><pad>",
    "<start_of_turn><end_of_turn>",
  ],
)
def test_control_tokens_round_trip_literally(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_control_tokens_encode_as_single_ids(tok, sp):
  sot, eot = tok.start_of_turn_id, tok.end_of_turn_id
  assert tok.encode("<start_of_turn>user\nhi<end_of_turn>") == [sot, *sp.encode("user\nhi"), eot]
  text = "Say: <start_of_turn>model\nOK <end_of_turn>\n bye"
  expected = [*sp.encode("Say: "), sot, *sp.encode("model\nOK "), eot, *sp.encode("\n bye")]
  assert tok.encode(text) == expected
  assert tok.encode("<bos>hi<eos>") == [tok.bos_id, *sp.encode("hi"), tok.eos_id]


def test_add_bos_eos_and_batch(tok, sp):
  assert tok.encode("hi", add_bos=True, add_eos=True) == [2, *sp.encode("hi"), 1]
  texts = ["one", "two <end_of_turn>", ""]
  assert tok.encode_batch(texts, add_bos=True) == [tok.encode(t, add_bos=True) for t in texts]


def test_encode_rejects_non_string(tok):
  with pytest.raises(TypeError, match="str"):
    tok.encode(b"bytes")


def test_decode_skip_control(tok):
  body = tok.encode("user\nhi")
  ids = [tok.pad_id, tok.bos_id, tok.start_of_turn_id, *body, tok.end_of_turn_id, tok.eos_id]
  assert tok.decode(ids, skip_control=True) == "user\nhi"
  assert tok.decode(ids) == "<pad><bos><start_of_turn>user\nhi<end_of_turn><eos>"
  assert tok.decode(np.array(ids), skip_control=True) == "user\nhi"


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE, 10**6])
def test_decode_out_of_range(tok, bad_id):
  with pytest.raises(ValueError, match=rf"token id {bad_id} .*vocab size {VOCAB_SIZE}"):
    tok.decode([5, bad_id])


# --- loading ---------------------------------------------------------------------


def test_load_from_bytes_matches_path(tok, model_path):
  from_bytes = Tokenizer(model_path.read_bytes())
  text = "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>"
  assert from_bytes.encode(text) == tok.encode(text)
  assert from_bytes.vocab_size == tok.vocab_size


def test_bad_model_path(tmp_path):
  missing = tmp_path / "missing.model"
  with pytest.raises(FileNotFoundError, match="missing.model"):
    Tokenizer(missing)
  not_a_model = tmp_path / "notes.model"
  not_a_model.write_text("not a model")
  with pytest.raises(ValueError, match="notes.model"):
    Tokenizer(str(not_a_model))


def test_bad_model_bytes():
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    Tokenizer(b"garbage")


# --- dummy prefix (Llama-style) models --------------------------------------------


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory):
  path = _train(tmp_path_factory, "prefixed", add_dummy_prefix=True)
  return Tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


def test_dummy_prefix_only_at_text_start(prefixed):
  tok, sp = prefixed
  assert tok.encode("Hello world") == sp.encode("Hello world")
  assert sp.id_to_piece(sp.encode("user")[0]).startswith("▁")
  ids = tok.encode("<start_of_turn>user")
  # Encoding the whole text would not put a space before "user" either.
  assert ids[0] == tok.start_of_turn_id
  assert not sp.id_to_piece(ids[1]).startswith("▁")
  assert "".join(map(sp.id_to_piece, ids[1:])) == "user"


@pytest.mark.parametrize(
  "text", ["Hello <start_of_turn> there<end_of_turn>", "<start_of_turn>user\nhi", "a<eos> b"]
)
def test_dummy_prefix_round_trip(prefixed, text):
  tok, _ = prefixed
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text, add_bos=True)) == "<bos>" + text


def test_dummy_prefix_after_bos_is_stripped(prefixed):
  tok, _ = prefixed
  ids = tok.encode("Hi there", add_bos=True)
  assert tok.decode(ids, skip_control=True) == "Hi there"
  assert tok.decode([tok.pad_id, *ids]) == "<pad><bos>Hi there"


# --- chat template ---------------------------------------------------------------

USER_HI = {"role": "user", "content": "Hi!"}


def test_chat_single_user_turn(tok):
  assert tok.apply_chat_template([USER_HI]) == (
    "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
  )
  assert tok.apply_chat_template([USER_HI], add_generation_prompt=False, add_bos=False) == (
    "<start_of_turn>user\nHi!<end_of_turn>\n"
  )


def test_chat_multi_turn(tok):
  messages = [
    USER_HI,
    {"role": "model", "content": "Hello.\nHow can I help?"},
    {"role": "user", "content": "Tell me about tides."},
  ]
  expected = (
    "<start_of_turn>user\nHi!<end_of_turn>\n"
    "<start_of_turn>model\nHello.\nHow can I help?<end_of_turn>\n"
    "<start_of_turn>user\nTell me about tides.<end_of_turn>\n"
  )
  assert tok.apply_chat_template(messages, add_generation_prompt=False, add_bos=False) == expected
  assert tok.apply_chat_template(messages, add_bos=False) == expected + "<start_of_turn>model\n"
  aliased = [messages[0], {**messages[1], "role": "assistant"}, messages[2]]
  assert tok.apply_chat_template(aliased) == tok.apply_chat_template(messages)


def test_chat_system_merged_into_first_user_turn(tok):
  messages = [
    {"role": "system", "content": "Be brief."},
    USER_HI,
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
  ]
  assert tok.apply_chat_template(messages, add_bos=False) == (
    "<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n"
    "<start_of_turn>model\n"
  )


@pytest.mark.parametrize(
  "messages, match",
  [
    ([], "empty"),
    ([USER_HI, {"role": "robot", "content": "x"}], "message 1: unknown role 'robot'"),
    ([{"content": "x"}], "message 0: unknown role None"),
    ([{"role": "user", "content": 3}], "message 0: content must be a str, got int"),
    ([USER_HI, {"role": "model"}], "message 1: content must be a str, got NoneType"),
    (["Hi!"], "message 0: expected a dict"),
    ([USER_HI, {"role": "system", "content": "x"}], "message 1: a system message must"),
    ([USER_HI, USER_HI], "message 1: two consecutive 'user' turns"),
    (
      [USER_HI, {"role": "model", "content": "a"}, {"role": "assistant", "content": "b"}],
      "message 2: two consecutive 'model' turns",
    ),
    (
      [{"role": "system", "content": "s"}, {"role": "model", "content": "a"}],
      "message 1: the system message must be followed by a user message",
    ),
    ([{"role": "system", "content": "s"}], "message 0: the system message must be followed"),
  ],
)
def test_chat_errors(tok, messages, match):
  with pytest.raises(ValueError, match=match):
    tok.apply_chat_template(messages)


def test_encode_chat(tok):
  messages = [
    {"role": "system", "content": "Be brief."},
    USER_HI,
    {"role": "model", "content": "Hello."},
    {"role": "user", "content": "Why is snow white?"},
  ]
  ids = tok.encode_chat(messages)
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
  assert ids == [tok.bos_id, *tok.encode(tok.apply_chat_template(messages, add_bos=False))]
  # The "<bos>" in the default template string encodes to the same single id.
  assert ids == tok.encode(tok.apply_chat_template(messages))
  assert ids.count(tok.start_of_turn_id) == 4 and ids.count(tok.end_of_turn_id) == 3
  assert tok.decode(ids, skip_control=True) == (
    "user\nBe brief.\n\nHi!\nmodel\nHello.\nuser\nWhy is snow white?\nmodel\n"
  )
  no_bos = tok.encode_chat(messages, add_generation_prompt=False, add_bos=False)
  assert tok.bos_id not in no_bos
  assert no_bos == tok.encode(tok.apply_chat_template(messages, False, add_bos=False))
