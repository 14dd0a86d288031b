"""Convert JSONL or plain-text files to one ArrayRecord file of UTF-8 JSON records.

  python -m gemma_jax.data.to_array_record INPUT [INPUT ...] --output OUT.array_record
      [--kind auto|jsonl|text]

JSONL lines are checked and copied; each blank-line separated paragraph of a text file becomes
{"text": paragraph}. The output is written with group_size:1, the layout grain reads fastest
at random, and is read back by sources of kind "array_record" with the same field names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence

from array_record.python.array_record_module import ArrayRecordWriter

from gemma_jax import exits
from gemma_jax.data.config import KINDS, infer_kind
from gemma_jax.data.sources import Bad, TextFileSource, parse


def records(paths: Sequence[str], kind: str) -> Iterator[bytes]:
  """The JSON bytes of every record; raises ValueError naming the file and line of a bad one."""
  source = TextFileSource(paths, "line" if kind == "jsonl" else "paragraph")
  for i in range(len(source)):
    record = parse(source[i], kind, {})
    if isinstance(record, Bad):
      raise ValueError(f"{record.origin}: {record.reason}")
    data = record.data if kind == "jsonl" else {"text": record.data}
    yield json.dumps(data, ensure_ascii=False).encode("utf-8")


def convert(paths: Sequence[str], output: str, kind: str = "auto") -> int:
  """Writes the records of `paths` to `output`; returns how many."""
  if kind == "auto":
    kind = infer_kind("inputs", paths)
  if kind not in ("jsonl", "text"):
    raise ValueError(f"can convert kinds 'jsonl' and 'text', not {kind!r}")
  writer = ArrayRecordWriter(output, "group_size:1")
  count = 0
  try:
    for count, record in enumerate(records(paths, kind), 1):
      writer.write(record)
  except BaseException:
    writer.close()
    os.remove(output)  # No half-written file that looks like a dataset.
    raise
  writer.close()
  return count


@exits.command("gemma_jax.data.to_array_record")
def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("inputs", nargs="+")
  parser.add_argument("--output", required=True)
  parser.add_argument("--kind", default="auto", choices=["auto", *KINDS[:2]])
  args = parser.parse_args(argv)
  try:
    count = convert(args.inputs, args.output, args.kind)
  except (ValueError, OSError) as e:
    print(f"error: {exits.describe(e)}", file=sys.stderr)
    return exits.EXIT_ERROR
  print(f"wrote {count} records to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
