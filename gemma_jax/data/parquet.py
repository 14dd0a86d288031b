"""Parquet files (the format Hugging Face datasets ship) as a random-access record source.

Rows are indexed from the files' footers alone; a row is read by decoding its whole row group
(only the columns asked for), and the last few decoded groups are kept, so reading in order
decodes each group once. A globally shuffled read decodes about one group per row: for large
shuffled corpora, convert to ArrayRecord or pre-tokenize first.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_CACHED_GROUPS = 4  # Decoded row groups kept per process (each one at most a few 100 MB).


class ParquetSource:
  """Rows of Parquet files as `(origin, row dict)`, origin "path[row n]" (n counts from 0
  within the file). `columns` None reads every column, else those of them the file has."""

  def __init__(self, paths: Sequence[str], columns: Sequence[str] | None):
    self._paths = tuple(paths)
    self._columns = []  # Per file: the columns to read.
    groups, sizes = [], []  # Per (file, row group), in order: (file, group, its first row).
    for k, path in enumerate(self._paths):
      meta = _metadata(path)
      names = meta.schema.to_arrow_schema().names
      wanted = names if columns is None else [c for c in names if c in set(columns)]
      if not wanted:
        raise ValueError(f"{path}: none of the columns {sorted(set(columns))} is in the file; "
                         f"it has {names} (map them with the source's 'fields')")
      self._columns.append(wanted)
      first = 0
      for g in range(meta.num_row_groups):
        groups.append((k, g, first))
        sizes.append(meta.row_group(g).num_rows)
        first += sizes[-1]
    self._groups = groups
    self._offsets = np.cumsum([0, *sizes]).tolist()
    self._cache: collections.OrderedDict[int, list[dict[str, Any]]] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getitem__(self, i: int) -> tuple[str, dict[str, Any]]:
    index = bisect.bisect_right(self._offsets, i) - 1
    k, _, first = self._groups[index]
    r = i - self._offsets[index]
    return f"{self._paths[k]}[row {first + r}]", self._rows(index)[r]

  def _rows(self, index: int) -> list[dict[str, Any]]:
    with self._lock:
      if index in self._cache:
        self._cache.move_to_end(index)
        return self._cache[index]
    k, g, _ = self._groups[index]
    rows = pq.ParquetFile(self._paths[k]).read_row_group(g, columns=self._columns[k]).to_pylist()
    with self._lock:
      self._cache[index] = rows
      while len(self._cache) > _CACHED_GROUPS:
        self._cache.popitem(last=False)
    return rows

  def __getstate__(self) -> dict[str, Any]:
    # Decoded groups and the lock stay in their process; a copy decodes on demand.
    return {**self.__dict__, "_cache": collections.OrderedDict(), "_lock": None}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _lock=threading.Lock())


def _metadata(path: str) -> pq.FileMetaData:
  try:
    return pq.ParquetFile(path).metadata
  except pa.ArrowInvalid as e:
    raise ValueError(f"{path}: not a Parquet file ({e})") from None
