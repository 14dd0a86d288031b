"""Random-access record sources and their parsing into `Record` (or `Bad`, naming the origin).

A source maps an index to `(origin, payload)`: origin is "path:line" for JSONL and text files
("path:line (bytes a-b)" for a piece of a long paragraph), "path[record i]" for ArrayRecord,
"path[row i]" for Parquet, "dir/shard-k.tokens.npy[document i]" for token shards and
"<memory source k>[i]" for in-memory lists. Parsing runs later, in the grain map (so in
worker processes when there are any), never at indexing time.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from gemma_jax.data.config import SourceSpec
from gemma_jax.data.parquet import ParquetSource
from gemma_jax.data.token_shards import TokenShardSource
from gemma_jax.tokenizer import Tokenizer

_WHITESPACE = np.frombuffer(b" \t\r\n\x0b\x0c", np.uint8)


@dataclasses.dataclass(frozen=True)
class Record:
  """A parsed record: a JSON value, or a plain-text document (str) or piece of one."""
  origin: str
  data: Any
  fields: Mapping[str, str]  # canonical field -> name used by this source
  starts: bool = True  # The record starts its document (False: a later piece of a long one).
  ends: bool = True  # The record ends its document.


@dataclasses.dataclass(frozen=True)
class Bad:
  """A record that cannot be used, and why."""
  origin: str
  reason: str


class TextFileSource:
  """Non-blank lines (`unit="line"`) or blank-line separated paragraphs of text files.

  The files are scanned once for record offsets; records are read on demand with pread, so
  the source pickles small and is safe to share between threads. With `piece_bytes`,
  paragraphs longer than that are records of at most that many bytes, cut at whitespace, so
  reading and tokenizing one costs the same whatever the document's size.
  """

  def __init__(self, paths: Sequence[str], unit: str, piece_bytes: int | None = None):
    self._paths = tuple(paths)
    parts = [_pieces(*_index_file(path, unit), path, piece_bytes) for path in self._paths]
    self._file = np.concatenate([np.full(len(p[0]), k, np.int32) for k, p in enumerate(parts)])
    self._start, self._end, self._line, self._edges = (np.concatenate(a) for a in zip(*parts))
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._file)

  def __getitem__(self, i: int) -> tuple[str, bytes] | tuple[str, bytes, bool, bool]:
    k, start, end = int(self._file[i]), int(self._start[i]), int(self._end[i])
    origin, payload = f"{self._paths[k]}:{self._line[i]}", os.pread(self._fd(k), end - start, start)
    edges = int(self._edges[i])
    if edges == _WHOLE:
      return origin, payload
    return f"{origin} (bytes {start}-{end})", payload, bool(edges & _STARTS), bool(edges & _ENDS)

  def _fd(self, k: int) -> int:
    with self._lock:
      if k not in self._fds:
        self._fds[k] = os.open(self._paths[k], os.O_RDONLY)
      return self._fds[k]

  def __getstate__(self) -> dict[str, Any]:
    # Descriptors and locks stay in their process; a copy reopens files lazily.
    return {**self.__dict__, "_fds": {}, "_lock": None}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def __del__(self) -> None:
    for fd in getattr(self, "_fds", {}).values():
      os.close(fd)


_INDEX_CHUNK = 1 << 22  # Bytes read at a time while indexing: memory does not grow with files.


def _index_file(path: str, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Byte ranges [start, end) and 1-based first line numbers of the file's records.

  The file is read in chunks; per line only the count of visible bytes before its end is
  kept, so indexing needs memory for the lines, not for the bytes."""
  newlines, visible_at, total, size = [], [], 0, os.path.getsize(path)
  buffer = np.empty(min(_INDEX_CHUNK, max(size, 1)), np.uint8)
  with open(path, "rb", buffering=0) as f:
    for offset in range(0, size, len(buffer)):
      chunk = buffer[:f.readinto(buffer)]
      visible = np.cumsum(~np.isin(chunk, _WHITESPACE, kind="table"), dtype=np.int32)
      at = np.flatnonzero(chunk == ord("\n"))
      newlines.append(at + offset)
      visible_at.append(visible[at].astype(np.int64) + total)  # A newline is not visible.
      total += int(visible[-1])
  newlines = np.concatenate([np.zeros(0, np.int64), *newlines])
  visible_at = np.concatenate([np.zeros(0, np.int64), *visible_at])
  starts = np.concatenate(([0], newlines + 1))
  ends = np.concatenate((newlines, [size]))
  blank = np.append(visible_at, total) == np.concatenate(([0], visible_at))
  lines = np.arange(1, len(starts) + 1)
  if unit == "line":
    return starts[~blank], ends[~blank], lines[~blank]
  first = ~blank & np.concatenate(([True], blank[:-1]))
  last = ~blank & np.concatenate((blank[1:], [True]))
  return starts[first], ends[last], lines[first]


_STARTS, _ENDS = 1, 2
_WHOLE = _STARTS | _ENDS


def _pieces(starts: np.ndarray, ends: np.ndarray, lines: np.ndarray, path: str,
            piece_bytes: int | None) -> tuple[np.ndarray, ...]:
  """The records' byte ranges with every one over `piece_bytes` cut into pieces, each cut
  after the last whitespace in the piece's second half (else at a UTF-8 character start),
  and per range whether it starts / ends its document (_STARTS | _ENDS bits)."""
  edges = np.full(len(starts), _WHOLE, np.int8)
  long = np.flatnonzero(ends - starts > piece_bytes) if piece_bytes else []
  if not len(long):
    return starts, ends, lines, edges
  fd = os.open(path, os.O_RDONLY)
  columns = (starts, ends, lines, edges)
  out, done = [], 0  # Runs of whole records, each long record's pieces between them.
  for i in map(int, long):
    out.append(tuple(c[done:i] for c in columns))
    bounds = [int(starts[i]), *_cuts(fd, int(starts[i]), int(ends[i]), piece_bytes),
              int(ends[i])]
    n = len(bounds) - 1
    flags = np.zeros(n, np.int8)
    flags[0] |= _STARTS
    flags[-1] |= _ENDS
    out.append((np.asarray(bounds[:-1], starts.dtype), np.asarray(bounds[1:], ends.dtype),
                np.full(n, lines[i], lines.dtype), flags))
    done = i + 1
  os.close(fd)
  out.append(tuple(c[done:] for c in columns))
  return tuple(np.concatenate(parts) for parts in zip(*out))


def _cuts(fd: int, start: int, end: int, piece_bytes: int) -> list[int]:
  cuts = []
  while end - start > piece_bytes:
    half = start + piece_bytes // 2
    window = np.frombuffer(os.pread(fd, start + piece_bytes + 1 - half, half), np.uint8)
    space = np.flatnonzero(np.isin(window[:-1], _WHITESPACE))
    cut = int(space[-1]) + 1 if space.size else piece_bytes - piece_bytes // 2
    while cut > 0 and window[cut] & 0xC0 == 0x80:  # Not inside a UTF-8 character.
      cut -= 1
    cuts.append(half + cut if cut > 0 else start + piece_bytes)
    start = cuts[-1]
  return cuts


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 JSON (see `to_array_record`)."""

  def __init__(self, paths: Sequence[str]):
    self._paths = tuple(paths)
    self._sources = [grain.sources.ArrayRecordDataSource(p) for p in self._paths]
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources]).tolist()

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getitem__(self, i: int) -> tuple[str, bytes]:
    k = bisect.bisect_right(self._offsets, i) - 1
    j = i - self._offsets[k]
    return f"{self._paths[k]}[record {j}]", self._sources[k][j]


def open_source(spec: SourceSpec, index: int, all_columns: bool = False,
                piece_bytes: int | None = None,
                tokenizer: Tokenizer | None = None) -> Sequence[tuple[str, Any]]:
  """The (origin, payload) sequence of one configured source; refuses an empty one.

  Parquet sources read only the columns `spec.fields` names, or all with `all_columns` (rl
  records keep their other fields as the reference); text sources cut paragraphs longer than
  `piece_bytes` into pieces; token shards refuse to be read with another `tokenizer` than
  the one that made them."""
  if spec.kind == "memory":
    source = [(f"<memory source {index}>[{i}]", r) for i, r in enumerate(spec.records)]
  elif spec.kind == "tokens":
    source = TokenShardSource(spec.paths, tokenizer and tokenizer.fingerprint,
                              spec.fields["tokens"])
  elif spec.kind == "parquet":
    source = ParquetSource(spec.paths, None if all_columns else list(spec.fields.values()))
  elif spec.kind == "array_record":
    source = ArrayRecordSource(spec.paths)
  else:
    text = spec.kind == "text"  # JSON records cannot be cut before they are parsed.
    source = TextFileSource(spec.paths, "paragraph" if text else "line",
                            piece_bytes if text else None)
  if not len(source):
    raise ValueError(f"config.data.sources[{index}] ({spec.name}) has no records")
  return source


def parse(item: tuple[str, Any], kind: str, fields: Mapping[str, str]) -> Record | Bad:
  """Decodes a payload: JSON for jsonl / array_record, text as is, memory objects and Parquet
  rows as given."""
  origin, payload, *edges = item
  if kind in ("memory", "parquet", "tokens"):
    return Record(origin, payload, fields)
  try:
    text = payload.decode("utf-8")
  except UnicodeDecodeError as e:
    return Bad(origin, f"not valid UTF-8 ({e.reason} at byte {e.start})")
  if kind == "text":
    return Record(origin, text, fields, *edges)
  try:
    return Record(origin, json.loads(text), fields)
  except json.JSONDecodeError as e:
    return Bad(origin, f"malformed JSON: {e.msg} (column {e.colno})")
