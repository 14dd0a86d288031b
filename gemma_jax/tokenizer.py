"""SentencePiece tokenizer with Gemma's special tokens and chat template.

Gemma's vocabulary puts <pad>, <eos>, <bos>, <unk> at ids 0-3, but the turn
tokens moved between releases (106/107 in Gemma 1/2, 105/106 in Gemma 3), so
every special id is looked up in the loaded model, never hard-coded.

Control pieces written literally in text (e.g. "<start_of_turn>", "<bos>")
encode as their single id: SentencePiece never emits control ids from text,
so `encode` splits the text on them and encodes the pieces in between. With
Gemma's identity normalizer and no dummy prefix, this equals encoding the
whole text natively except that no token spans a control piece. For models
with a dummy prefix, only the segment at the very start of the text gets the
prefix space, as it would when encoding the whole text; a model that strips
extra whitespace strips it per segment.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# Gemma has no system role; "assistant" is accepted as an alias of "model".
_ROLES = {"system": "system", "user": "user", "model": "model", "assistant": "model"}

# Ids 0-3 hold <pad>, <eos>, <bos>, <unk> in Gemma's layout.
_FIRST_FREE_ID = 4

PathLike = str | os.PathLike[str]
Message = Mapping[str, str]


class Tokenizer:
  """Gemma tokenizer over a SentencePiece model (path or serialized bytes)."""

  def __init__(self, model: PathLike | bytes):
    source = "<serialized bytes>" if isinstance(model, (bytes, bytearray)) else str(model)
    proto = _read_model(model)
    self._sp = _load_processor(proto, source)
    # Names the model: pre-tokenized data records it, and refuses a different tokenizer.
    self.fingerprint = hashlib.sha256(proto).hexdigest()
    mid_proto = _without_dummy_prefix(proto)
    self._sp_mid = self._sp if mid_proto is None else _load_processor(mid_proto, source)
    self._turn_ids = {piece: self._find_piece(piece) for piece in (START_OF_TURN, END_OF_TURN)}
    self._special = {
      self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)
    }
    # Turn tokens are special even if the model stores them as user-defined pieces.
    self._special.update({p: i for p, i in self._turn_ids.items() if i is not None})
    self._special_ids = frozenset(self._special.values())
    # Longest first, so a piece that is a prefix of another cannot win.
    pieces = sorted(filter(None, self._special), key=len, reverse=True)
    alternatives = "|".join(map(re.escape, pieces))
    self._split_re = re.compile(f"({alternatives})") if pieces else None
    # Ids that may precede the start of the text (left padding, BOS).
    self._prefix_ids = frozenset(i for i in (self._sp.pad_id(), self._sp.bos_id()) if i >= 0)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return _defined("pad", self._sp.pad_id())

  @property
  def eos_id(self) -> int:
    return _defined("eos", self._sp.eos_id())

  @property
  def bos_id(self) -> int:
    return _defined("bos", self._sp.bos_id())

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def start_of_turn_id(self) -> int:
    return self._turn_id(START_OF_TURN)

  @property
  def end_of_turn_id(self) -> int:
    return self._turn_id(END_OF_TURN)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Encodes text; literal control pieces become their single ids."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = [self.bos_id] if add_bos else []
    parts = self._split_re.split(text) if self._split_re else [text]
    # re.split with a group alternates text segments and matched pieces.
    for k, part in enumerate(parts):
      if k % 2:
        ids.append(self._special[part])
      elif part:
        ids.extend((self._sp if k == 0 else self._sp_mid).encode(part))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def encode_batch(
    self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    return [self.encode(text, add_bos, add_eos) for text in texts]

  def decode(self, ids: Iterable[int], skip_control: bool = False) -> str:
    """Decodes ids; control tokens are dropped or rendered as their piece text."""
    ids = [self._checked_id(i) for i in ids]
    parts = []
    at_start = True  # Mirrors encode: the dummy prefix only precedes the text start.
    for special, group in itertools.groupby(ids, self._special_ids.__contains__):
      group = list(group)
      if special:
        if not skip_control:
          parts.extend(map(self._sp.id_to_piece, group))
        at_start = at_start and self._prefix_ids.issuperset(group)
      else:
        parts.append((self._sp if at_start else self._sp_mid).decode(group))
        at_start = False
    return "".join(parts)

  def apply_chat_template(
    self, messages: Sequence[Message], add_generation_prompt: bool = True, add_bos: bool = True
  ) -> str:
    """Formats messages as Gemma turns; starts with the "<bos>" piece text if add_bos."""
    for piece in self._turn_ids:
      self._turn_id(piece)  # Fail before formatting if the model cannot encode turns.
    text = "".join(
      f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n"
      for role, content in chat_turns(messages)
    )
    if add_generation_prompt:
      text += f"{START_OF_TURN}model\n"
    return (self._sp.id_to_piece(self.bos_id) if add_bos else "") + text

  def encode_chat(
    self, messages: Sequence[Message], add_generation_prompt: bool = True, add_bos: bool = True
  ) -> list[int]:
    """Token ids of the chat template, with the BOS id first if add_bos."""
    text = self.apply_chat_template(messages, add_generation_prompt, add_bos=False)
    return self.encode(text, add_bos=add_bos)

  def _find_piece(self, piece: str) -> int | None:
    # piece_to_id returns the unk id for unknown pieces.
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  def _turn_id(self, piece: str) -> int:
    i = self._turn_ids[piece]
    if i is None:
      raise ValueError(
        f"tokenizer model has no {piece!r} piece; Gemma chat formatting needs "
        f"{START_OF_TURN!r} and {END_OF_TURN!r}"
      )
    return i

  def _checked_id(self, i: int) -> int:
    i = operator.index(i)  # Accepts numpy integers, rejects floats.
    if not 0 <= i < self.vocab_size:
      raise ValueError(f"token id {i} is out of range for vocab size {self.vocab_size}")
    return i


def _read_model(model: PathLike | bytes) -> bytes:
  if isinstance(model, (bytes, bytearray)):
    return bytes(model)
  path = Path(model)
  if not path.is_file():
    raise FileNotFoundError(f"SentencePiece model file not found: {path}")
  return path.read_bytes()


def _load_processor(proto: bytes, source: str) -> spm.SentencePieceProcessor:
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(proto)
  except RuntimeError as e:
    raise ValueError(f"not a valid SentencePiece model: {source}") from e
  return sp


def _without_dummy_prefix(proto: bytes) -> bytes | None:
  """The model with its dummy prefix disabled, or None if it has none."""
  model = sentencepiece_model_pb2.ModelProto.FromString(proto)
  if not model.normalizer_spec.add_dummy_prefix:
    return None
  model.normalizer_spec.add_dummy_prefix = False
  return model.SerializeToString()


def _defined(name: str, i: int) -> int:
  # SentencePiece reports -1 for special tokens the model disabled.
  if i < 0:
    raise ValueError(f"tokenizer model defines no {name} token")
  return i


def chat_turns(messages: Sequence[Message]) -> list[tuple[str, str]]:
  """Validated (role, text) turns, with a system message merged into the first user turn."""
  if not messages:
    raise ValueError("messages must not be empty")
  turns: list[tuple[str, str]] = []
  system = None
  for i, message in enumerate(messages):
    role, content = _parse_message(i, message)
    if role == "system":
      if i:
        raise ValueError(f"message {i}: a system message must be first")
      system = content
      continue
    if turns and turns[-1][0] == role:
      raise ValueError(f"message {i}: two consecutive {role!r} turns; roles must alternate")
    if system is not None:
      if role != "user":
        raise ValueError(
          f"message {i}: the system message must be followed by a user message"
        )
      content, system = f"{system}\n\n{content}", None
    turns.append((role, content))
  if system is not None:
    raise ValueError("message 0: the system message must be followed by a user message")
  return turns


def _parse_message(i: int, message: Message) -> tuple[str, str]:
  if not isinstance(message, Mapping):
    raise ValueError(
      f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}"
    )
  role, content = message.get("role"), message.get("content")
  if not isinstance(role, str) or role not in _ROLES:
    raise ValueError(f"message {i}: unknown role {role!r}; expected one of {sorted(_ROLES)}")
  if not isinstance(content, str):
    raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
  return _ROLES[role], content


def train_sentencepiece(
  text_files: PathLike | Sequence[PathLike],
  model_prefix: PathLike,
  vocab_size: int = 1000,
  *,
  turn_ids: tuple[int, int] | None = (4, 5),
  add_dummy_prefix: bool = False,
) -> Path:
  """Trains a small, reproducible BPE model with Gemma's layout; returns the .model path.

  Ids 0-3 are <pad>, <eos>, <bos>, <unk>. `turn_ids` places <start_of_turn> and
  <end_of_turn> as CONTROL pieces at those ids (any ids from 4 up, with
  <unusedK> control pieces filling the gap below them); None leaves them out.
  Like Gemma's, the model uses byte fallback, split digits, the identity
  normalizer and no dummy prefix (`add_dummy_prefix` gives a Llama-style one).
  """
  files = [text_files] if isinstance(text_files, (str, os.PathLike)) else list(text_files)
  missing = [str(f) for f in files if not Path(f).is_file()]
  if missing:
    raise FileNotFoundError(f"training text files not found: {missing}")
  spm.SentencePieceTrainer.train(
    input=[str(f) for f in files],
    model_prefix=str(model_prefix),
    vocab_size=vocab_size,
    model_type="bpe",
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    control_symbols=_control_symbols(turn_ids, vocab_size),
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=add_dummy_prefix,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    num_threads=1,  # BPE training is deterministic on a single thread.
    minloglevel=2,
  )
  return Path(f"{model_prefix}.model")


def _control_symbols(turn_ids: tuple[int, int] | None, vocab_size: int) -> list[str]:
  """Control pieces for ids 4.. so the turn tokens land exactly on turn_ids."""
  if turn_ids is None:
    return []
  start, end = turn_ids
  if start == end or min(turn_ids) < _FIRST_FREE_ID or max(turn_ids) >= vocab_size:
    raise ValueError(
      f"turn_ids must be two distinct ids in [{_FIRST_FREE_ID}, {vocab_size}), got {turn_ids}"
    )
  fillers = (f"<unused{k}>" for k in itertools.count())
  return [
    START_OF_TURN if i == start else END_OF_TURN if i == end else next(fillers)
    for i in range(_FIRST_FREE_ID, max(turn_ids) + 1)
  ]
