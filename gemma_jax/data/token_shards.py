"""Pre-tokenized token shards (written by `pretokenize`) as a random-access record source.

A record is one document's ids, {"tokens": int32 array} (BOS / EOS are added by the pretrain
format, as for text), read from memory-mapped .npy files: no tokenizing at training time.
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "gemma_jax token shards v1"


def shard_names(k: int) -> tuple[str, str]:
  """The token and offset file names of shard k."""
  return f"shard-{k:05d}.tokens.npy", f"shard-{k:05d}.offsets.npy"


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a token shard manifest ({e})") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def check_tokenizer(directory: str, manifest: dict[str, Any], fingerprint: str) -> None:
  """Refuses shards made with another tokenizer: their ids would mean other pieces."""
  made = manifest["tokenizer"]
  if made["sha256"] != fingerprint:
    raise ValueError(
      f"{directory} was tokenized with another tokenizer ({made['path']}, vocab "
      f"{made['vocab_size']}, sha256 {made['sha256'][:12]}...) than this run's (sha256 "
      f"{fingerprint[:12]}...); pretokenize it again with this tokenizer, or train with that one")


class TokenShardSource:
  """The documents of one or more shard directories, as (origin, {field: ids})."""

  def __init__(self, directories: tuple[str, ...], fingerprint: str | None, field: str):
    self._field = field
    self._shards: list[tuple[str, np.ndarray, np.ndarray]] = []  # (origin, tokens, offsets)
    for directory in directories:
      manifest = read_manifest(directory)
      if fingerprint is not None:
        check_tokenizer(directory, manifest, fingerprint)
      for k in range(len(manifest["shards"])):
        tokens, offsets = (np.load(os.path.join(directory, n), mmap_mode="r")
                           for n in shard_names(k))
        self._shards.append((os.path.join(directory, shard_names(k)[0]), tokens, offsets))
    self._starts = np.cumsum([0] + [len(o) - 1 for _, _, o in self._shards]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, i: int) -> tuple[str, dict[str, np.ndarray]]:
    k = bisect.bisect_right(self._starts, i) - 1
    origin, tokens, offsets = self._shards[k]
    j = i - self._starts[k]
    ids = np.asarray(tokens[int(offsets[j]):int(offsets[j + 1])], np.int32)
    return f"{origin}[document {j}]", {self._field: ids}
