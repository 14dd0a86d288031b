"""Tokenization and the four formats: a `Record` becomes a list of segments, or a `Bad`.

Each segment is a dict of 1-D numpy arrays. For pretrain and chat: `tokens` (int32) and
`weights` (float32), the weight of each token AS A TARGET (the pipeline shifts it onto the
position that predicts it). Preference segments hold the same pair of arrays with `chosen_`
and `rejected_` prefixes. RL segments are finished prompt rows (see `pipeline`).

- pretrain: BOS + text (or pre-tokenized `tokens`) + EOS; every token but BOS is a target. A
  piece of a long text document (see `sources.TextFileSource`) has BOS only if it starts the
  document and EOS only if it ends it; its first token is not a target.
- chat: the Gemma template over `messages`; targets are the tokens of model turns including
  their <end_of_turn>. A model turn is encoded as its header "<start_of_turn>model\\n" and its
  content separately, the token boundary a sampler sees after the generation prompt.
- preference: prompt (a string, as one user turn, or a message list) + response + <end_of_turn>
  for `chosen` and `rejected`; targets are the response tokens and <end_of_turn>.
- rl: the prompt up to the generation prompt, padded to seq_len; the record's other fields are
  kept as `reference`.
Without `chat_template`, prompts are encoded as plain text after BOS and responses end in EOS.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_jax.data.config import Settings
from gemma_jax.data.sources import Bad, Record
from gemma_jax.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer, chat_turns

Segment = dict[str, Any]


class _Invalid(Exception):
  """Why a record cannot be used; becomes a `Bad` naming the record's origin."""


class Formatter:
  """Record -> segments for one format; picklable, so grain workers can run it."""

  def __init__(self, tokenizer: Tokenizer, settings: Settings):
    self._tok = tokenizer
    self._s = settings
    self._format = {"pretrain": self._pretrain, "chat": self._chat,
                    "preference": self._preference, "rl": self._rl}[settings.format]

  def __call__(self, item: Record | Bad) -> list[Segment] | Bad:
    if isinstance(item, Bad):
      return item
    try:
      return self._format(item)
    except _Invalid as e:
      return Bad(item.origin, str(e))

  # --- formats ---------------------------------------------------------------

  def _pretrain(self, record: Record) -> list[Segment]:
    data = record.data
    text_field, tokens_field = record.fields["text"], record.fields["tokens"]
    if isinstance(data, dict) and text_field not in data and tokens_field in data:
      ids = self._token_ids(data[tokens_field], tokens_field)
    else:
      text = _get(record, "text", str)
      if not text.strip():
        if not (record.starts and record.ends):
          return []  # A blank piece of a long document: nothing to train on, nothing wrong.
        raise _Invalid(f"empty document (field {text_field!r})")
      ids = encode_in_pieces(self._tok, text, self._s.piece_bytes)
    # A piece of a long document has BOS only if it starts it, EOS only if it ends it.
    tokens = [self._tok.bos_id] * record.starts + ids + [self._tok.eos_id] * record.ends
    return self._fit(tokens, [0.0] + [1.0] * (len(tokens) - 1))

  def _chat(self, record: Record) -> list[Segment]:
    turns = self._turns(_get(record, "messages", list), record.fields["messages"])
    if all(role != "model" for role, _ in turns):
      raise _Invalid("chat has no model turn to train on")
    tokens, weights = [self._tok.bos_id], [0.0]
    for role, content in turns:
      if role == "model":
        _extend(tokens, weights, self._tok.encode(f"{START_OF_TURN}model\n"), 0.0)
        _extend(tokens, weights, [*self._tok.encode(content), self._tok.end_of_turn_id], 1.0)
        _extend(tokens, weights, self._tok.encode("\n"), 0.0)
      else:
        _extend(tokens, weights, self._tok.encode(
          f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n"), 0.0)
    return self._fit(tokens, weights)

  def _preference(self, record: Record) -> list[Segment]:
    prompt = self._prompt(record)
    if len(prompt) >= self._s.seq_len:
      raise _Invalid(f"prompt has {len(prompt)} tokens, leaving no room for a response "
                     f"in seq_len={self._s.seq_len}")
    segment = {}
    for name in ("chosen", "rejected"):
      response = _get(record, name, str)
      if not response.strip():
        raise _Invalid(f"empty response (field {record.fields[name]!r})")
      tokens = prompt + self._response(response)
      weights = [0.0] * len(prompt) + [1.0] * (len(tokens) - len(prompt))
      if len(tokens) > self._s.seq_len and not self._s.truncate_long:
        raise _Invalid(f"{name} has {len(tokens)} tokens, more than seq_len={self._s.seq_len} "
                       "(a pair cannot be split; set truncate_long to truncate it)")
      segment[f"{name}_tokens"] = np.asarray(tokens[:self._s.seq_len], np.int32)
      segment[f"{name}_weights"] = np.asarray(weights[:self._s.seq_len], np.float32)
    return [segment]

  def _rl(self, record: Record) -> list[Segment]:
    ids = self._prompt(record)
    n, size = len(ids), self._s.seq_len
    if n > size:
      raise _Invalid(f"prompt has {n} tokens, more than seq_len={size}")
    start = size - n if self._s.rl_padding == "left" else 0
    tokens, positions, segment_ids = (np.zeros(size, np.int32) for _ in range(3))
    tokens[start:start + n] = ids
    positions[start:start + n] = np.arange(n)
    segment_ids[start:start + n] = 1
    prompt_field = record.fields["prompt"]
    reference = ({k: v for k, v in record.data.items() if k != prompt_field}
                 if isinstance(record.data, dict) else {})
    return [{"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
             "lengths": np.int32(n), "reference": reference}]

  # --- pieces ----------------------------------------------------------------

  def _prompt(self, record: Record) -> list[int]:
    """Prompt ids up to where the response starts."""
    prompt = _get(record, "prompt", (str, list))
    if isinstance(prompt, str) and not prompt.strip():
      raise _Invalid(f"empty prompt (field {record.fields['prompt']!r})")
    if not self._s.chat_template:
      if not isinstance(prompt, str):
        raise _Invalid("a message-list prompt needs config.data.chat_template=True")
      return self._tok.encode(prompt, add_bos=True)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    turns = self._turns(messages, record.fields["prompt"])
    if turns[-1][0] != "user":
      raise _Invalid("a prompt must end with a user turn")
    return self._tok.encode_chat([{"role": r, "content": c} for r, c in turns])

  def _response(self, text: str) -> list[int]:
    end = self._tok.end_of_turn_id if self._s.chat_template else self._tok.eos_id
    return [*self._tok.encode(text), end]

  def _turns(self, messages: Sequence[Any], field: str) -> list[tuple[str, str]]:
    try:
      return chat_turns(messages)
    except ValueError as e:
      raise _Invalid(f"field {field!r}: {e}") from None

  def _token_ids(self, ids: Any, field: str) -> list[int]:
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 1:
      return self._checked_array(ids, field)  # Token shards: checked at NumPy speed.
    if not isinstance(ids, list) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
      raise _Invalid(f"field {field!r} must be a list of ints")
    if not ids:
      raise _Invalid(f"empty document (field {field!r})")
    vocab = self._tok.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
      raise _Invalid(f"token id {bad} in field {field!r} is out of range [0, {vocab})")
    return ids

  def _checked_array(self, ids: np.ndarray, field: str) -> list[int]:
    if not ids.size:
      raise _Invalid(f"empty document (field {field!r})")
    out_of_range = (ids < 0) | (ids >= self._tok.vocab_size)
    if out_of_range.any():
      raise _Invalid(f"token id {ids[out_of_range][0]} in field {field!r} is out of range "
                     f"[0, {self._tok.vocab_size})")
    return ids.tolist()

  def _fit(self, tokens: list[int], weights: list[float]) -> list[Segment]:
    """One segment, or several of at most seq_len tokens, per the packing settings."""
    size = self._s.seq_len
    if self._s.truncate_long:
      tokens, weights = tokens[:size], weights[:size]
    elif self._s.packing == "concat":
      size = len(tokens)  # Concat-then-split packing splits at row boundaries itself.
    return [{"tokens": np.asarray(tokens[i:i + size], np.int32),
             "weights": np.asarray(weights[i:i + size], np.float32)}
            for i in range(0, len(tokens), size)]


def encode_in_pieces(tokenizer: Tokenizer, text: str, piece_chars: int) -> list[int]:
  """`tokenizer.encode(text)`, a piece of at most `piece_chars` characters at a time (cut
  after the last space or newline in the piece's second half): SentencePiece slows down on
  very long inputs, and pieces keep its working memory bounded. Ids may differ from a single
  encode only at the cuts."""
  if len(text) <= piece_chars:
    return tokenizer.encode(text)
  ids, start = [], 0
  while len(text) - start > piece_chars:
    half, stop = start + piece_chars // 2, start + piece_chars
    cut = max(text.rfind(" ", half, stop), text.rfind("\n", half, stop)) + 1 or stop
    ids.extend(tokenizer.encode(text[start:cut]))
    start = cut
  ids.extend(tokenizer.encode(text[start:]))
  return ids


def _get(record: Record, field: str, types: type | tuple[type, ...]) -> Any:
  """The record's value for a canonical field, type-checked."""
  name = record.fields[field]
  data = {name: record.data} if isinstance(record.data, str) and field == "text" else record.data
  if not isinstance(data, dict):
    raise _Invalid(f"expected a JSON object with field {name!r}, got {type(data).__name__}")
  if name not in data:
    raise _Invalid(f"missing field {name!r}")
  value = data[name]
  if not isinstance(value, types):
    expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    raise _Invalid(f"field {name!r} must be {expected}, got {type(value).__name__}")
  return value


def _extend(tokens: list[int], weights: list[float], ids: list[int], weight: float) -> None:
  tokens.extend(ids)
  weights.extend([weight] * len(ids))
