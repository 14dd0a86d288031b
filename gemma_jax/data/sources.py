"""Random-access record sources and their parsing into `Record` (or `Bad`, naming the origin).

A source maps an index to `(origin, payload)`: origin is "path:line" for JSONL and text files,
"path[record i]" for ArrayRecord, "path[row i]" for Parquet and "<memory source k>[i]" for in-memory lists. Parsing runs
later, in the grain map (so in worker processes when there are any), never at indexing time.
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

_WHITESPACE = np.frombuffer(b" \t\r\n\x0b\x0c", np.uint8)


@dataclasses.dataclass(frozen=True)
class Record:
  """A parsed record: a JSON value, or a plain-text document (str)."""
  origin: str
  data: Any
  fields: Mapping[str, str]  # canonical field -> name used by this source


@dataclasses.dataclass(frozen=True)
class Bad:
  """A record that cannot be used, and why."""
  origin: str
  reason: str


class TextFileSource:
  """Non-blank lines (`unit="line"`) or blank-line separated paragraphs of text files.

  The files are scanned once for record offsets; records are read on demand with pread, so
  the source pickles small and is safe to share between threads.
  """

  def __init__(self, paths: Sequence[str], unit: str):
    self._paths = tuple(paths)
    parts = [_index_file(path, unit) for path in self._paths]
    self._file = np.concatenate([np.full(len(p[0]), k, np.int32) for k, p in enumerate(parts)])
    self._start, self._end, self._line = (np.concatenate(a) for a in zip(*parts))
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._file)

  def __getitem__(self, i: int) -> tuple[str, bytes]:
    k, start, end = int(self._file[i]), int(self._start[i]), int(self._end[i])
    return f"{self._paths[k]}:{self._line[i]}", os.pread(self._fd(k), end - start, start)

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


def _index_file(path: str, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Byte ranges [start, end) and 1-based first line numbers of the file's records."""
  data = np.fromfile(path, np.uint8)
  newlines = np.flatnonzero(data == ord("\n"))
  starts = np.concatenate(([0], newlines + 1))
  ends = np.concatenate((newlines, [data.size]))
  visible = np.concatenate(([0], np.cumsum(~np.isin(data, _WHITESPACE))))
  blank = visible[ends] == visible[starts]
  lines = np.arange(1, len(starts) + 1)
  if unit == "line":
    return starts[~blank], ends[~blank], lines[~blank]
  first = ~blank & np.concatenate(([True], blank[:-1]))
  last = ~blank & np.concatenate((blank[1:], [True]))
  return starts[first], ends[last], lines[first]


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


def open_source(spec: SourceSpec, index: int,
                all_columns: bool = False) -> Sequence[tuple[str, Any]]:
  """The (origin, payload) sequence of one configured source; refuses an empty one.

  Parquet sources read only the columns `spec.fields` names, or all with `all_columns` (rl
  records keep their other fields as the reference)."""
  if spec.kind == "memory":
    source = [(f"<memory source {index}>[{i}]", r) for i, r in enumerate(spec.records)]
  elif spec.kind == "parquet":
    source = ParquetSource(spec.paths, None if all_columns else list(spec.fields.values()))
  elif spec.kind == "array_record":
    source = ArrayRecordSource(spec.paths)
  else:
    source = TextFileSource(spec.paths, "line" if spec.kind == "jsonl" else "paragraph")
  if not len(source):
    raise ValueError(f"config.data.sources[{index}] ({spec.name}) has no records")
  return source


def parse(item: tuple[str, Any], kind: str, fields: Mapping[str, str]) -> Record | Bad:
  """Decodes a payload: JSON for jsonl / array_record, text as is, memory objects and Parquet
  rows as given."""
  origin, payload = item
  if kind in ("memory", "parquet"):
    return Record(origin, payload, fields)
  try:
    text = payload.decode("utf-8")
  except UnicodeDecodeError as e:
    return Bad(origin, f"not valid UTF-8 ({e.reason} at byte {e.start})")
  if kind == "text":
    return Record(origin, text, fields)
  try:
    return Record(origin, json.loads(text), fields)
  except json.JSONDecodeError as e:
    return Bad(origin, f"malformed JSON: {e.msg} (column {e.colno})")
