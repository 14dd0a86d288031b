"""Tokenize text sources once, into NumPy token shards that training reads without tokenizing.

  python -m gemma_jax.data.pretokenize INPUT [INPUT ...] --tokenizer tokenizer.model
      --output DIR [--kind auto|jsonl|text|array_record|parquet] [--field text]
      [--shard-tokens 100000000]

DIR gets shard-NNNNN.tokens.npy (int32, the documents' ids end to end, without BOS / EOS),
shard-NNNNN.offsets.npy (int64, where each document starts, plus the end) and manifest.json
naming the tokenizer (its SHA-256): a source {"path": DIR} of kind "tokens" refuses to train
with any other. Long text documents are tokenized in pieces (data.piece_bytes) and joined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from gemma_jax import exits
from gemma_jax.data.config import FIELDS, KINDS, SourceSpec, default_config, infer_kind
from gemma_jax.data.formats import encode_in_pieces
from gemma_jax.data.sources import Bad, Record, open_source, parse
from gemma_jax.data.token_shards import FORMAT, MANIFEST, shard_names
from gemma_jax.tokenizer import Tokenizer


def documents(source: Sequence, spec: SourceSpec, tokenizer: Tokenizer,
              progress: _Progress) -> Iterator[np.ndarray]:
  """Each document's ids; a document cut into pieces by the source is joined again."""
  pieces: list[np.ndarray] = []
  for i in range(len(source)):
    record = parse(source[i], spec.kind, spec.fields)
    ids = _ids(record, spec.fields["text"], tokenizer)
    progress.update(i + 1, ids.size)
    pieces.append(ids)
    if record.ends:
      yield pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
      pieces = []


def _ids(record: Record | Bad, field: str, tokenizer: Tokenizer) -> np.ndarray:
  if isinstance(record, Bad):
    raise ValueError(f"{record.origin}: {record.reason}")
  text = record.data if isinstance(record.data, str) else (
    record.data.get(field) if isinstance(record.data, dict) else None)
  if not isinstance(text, str):
    raise ValueError(f"{record.origin}: field {field!r} must be a string, got "
                     f"{type(text).__name__}")
  if not text.strip() and record.starts and record.ends:
    raise ValueError(f"{record.origin}: empty document (field {field!r})")
  return np.asarray(encode_in_pieces(tokenizer, text, default_config().piece_bytes), np.int32)


class _Progress:
  """A progress bar on stderr, redrawn at most every half second."""

  def __init__(self, total: int):
    self.total, self.tokens, self._start, self._drawn = total, 0, time.perf_counter(), 0.0
    self._open = False  # A bar is drawn without its newline.

  def close(self) -> None:
    if self._open:
      print(file=sys.stderr, flush=True)

  def update(self, done: int, tokens: int) -> None:
    self.tokens += tokens
    now = time.perf_counter()
    if now - self._drawn >= 0.5 or done == self.total:
      self._drawn = now
      bar = "#" * (20 * done // self.total)
      rate = self.tokens / max(now - self._start, 1e-9)
      print(f"\rpretokenize [{bar:<20}] {done}/{self.total} records, {self.tokens:,} tokens, "
            f"{rate:,.0f} tokens/s", end="\n" if done == self.total else "", file=sys.stderr,
            flush=True)
      self._open = done != self.total


def pretokenize(paths: Sequence[str], tokenizer_path: str, output: str, kind: str = "auto",
                field: str = "text", shard_tokens: int = 100_000_000) -> dict:
  """Writes the shards and the manifest (last, so a partial DIR is no dataset); returns it."""
  tokenizer = Tokenizer(tokenizer_path)
  kind = infer_kind("inputs", paths) if kind == "auto" else kind
  if kind not in ("jsonl", "text", "array_record", "parquet"):
    raise ValueError(f"can pretokenize text sources (jsonl, text, array_record, parquet), not "
                     f"{kind!r}")
  fields = {f: field if f == "text" else f for f in FIELDS}
  spec = SourceSpec(kind, tuple(paths), (), 1.0, fields, "inputs")
  source = open_source(spec, 0, piece_bytes=default_config().piece_bytes)
  os.makedirs(output, exist_ok=True)
  shards, pending, size = [], [], 0
  progress = _Progress(len(source))
  try:
    for ids in documents(source, spec, tokenizer, progress):
      pending.append(ids)
      size += ids.size
      if size >= shard_tokens:  # A shard is held in memory until written.
        shards.append(_write_shard(output, len(shards), pending))
        pending, size = [], 0
  finally:
    progress.close()
  if pending:
    shards.append(_write_shard(output, len(shards), pending))
  manifest = {"format": FORMAT, "tokenizer": {"sha256": tokenizer.fingerprint,
                                              "vocab_size": tokenizer.vocab_size,
                                              "path": os.path.abspath(tokenizer_path)},
              "sources": [os.path.abspath(p) for p in paths], "field": field, "shards": shards}
  with open(os.path.join(output, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def _write_shard(output: str, k: int, docs: list[np.ndarray]) -> dict:
  tokens_name, offsets_name = shard_names(k)
  offsets = np.cumsum([0] + [d.size for d in docs], dtype=np.int64)
  np.save(os.path.join(output, tokens_name), np.concatenate(docs).astype(np.int32))
  np.save(os.path.join(output, offsets_name), offsets)
  return {"documents": len(docs), "tokens": int(offsets[-1])}


@exits.command("gemma_jax.data.pretokenize")
def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("inputs", nargs="+")
  parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
  parser.add_argument("--output", required=True, help="directory for the shards")
  parser.add_argument("--kind", default="auto", choices=["auto", *KINDS[:4]])
  parser.add_argument("--field", default="text", help="the text field (column) of the records")
  parser.add_argument("--shard-tokens", type=int, default=100_000_000)
  args = parser.parse_args(argv)
  try:
    manifest = pretokenize(args.inputs, args.tokenizer, args.output, args.kind, args.field,
                           args.shard_tokens)
  except (ValueError, OSError) as e:
    print(f"error: {exits.describe(e)}", file=sys.stderr)
    return exits.EXIT_ERROR
  docs = sum(s["documents"] for s in manifest["shards"])
  tokens = sum(s["tokens"] for s in manifest["shards"])
  print(f"wrote {docs} documents, {tokens} tokens in {len(manifest['shards'])} shards to "
        f"{args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
