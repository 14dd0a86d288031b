"""Data pipeline throughput: tokens/s of parse + tokenize + pack + batch, and packing efficiency.

  python -m benchmarks.data_throughput [--seq_len 1024] [--batch_size 8] [--batches 200]
      [--no-shuffle] [--json benchmarks/data_throughput.json]

Runs `gemma_jax.data.make_dataset` (host-side numpy batches, one process) on the shipped data:
the prose corpus (pretraining, concat and first-fit packing) and the chat SFT set, each with 0,
1 and 2 grain worker processes. The tokenizer is a 1000-piece SentencePiece model trained on
the corpus, so documents are longer in tokens than with Gemma's 256k vocabulary.

tokens/s counts real (non-padding) tokens over the timed batches, after the first (which
includes worker start-up) and a few more; packing efficiency is real tokens / all slots.
grain's index shuffle costs 0.3-1.7 ms per record on sets under ~1000 records like these
(about 10 us from 4000 records up), so --no-shuffle shows the cost of the rest.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

from gemma_jax.data import default_config, make_dataset
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data"
CASES = [  # name, source file, format, packing
  ("corpus pretrain", "tokenizer_corpus.txt", "pretrain", "concat"),
  ("corpus pretrain", "tokenizer_corpus.txt", "pretrain", "first_fit"),
  ("chat SFT", "chat_sft.jsonl", "chat", "first_fit"),
]
WORKERS = (0, 1, 2)
_WARMUP = 5  # Batches after the first one, untimed, so that workers are in full flow.


def measure(tokenizer: Tokenizer, source: str, fmt: str, packing: str, workers: int,
            args: argparse.Namespace) -> dict[str, float]:
  c = default_config()
  c.sources = [{"path": str(DATA / source)}]
  c.format, c.packing, c.worker_count = fmt, packing, workers
  c.seq_len, c.batch_size, c.shuffle = args.seq_len, args.batch_size, args.shuffle
  it = iter(make_dataset(c, tokenizer))
  start = time.perf_counter()
  next(it)
  first = time.perf_counter()
  for _ in range(_WARMUP):
    next(it)
  timed = time.perf_counter()
  real = slots = 0
  for _ in range(args.batches):
    batch = next(it)
    real += int((batch["segment_ids"] > 0).sum())
    slots += batch["segment_ids"].size
  seconds = time.perf_counter() - timed
  it.close()
  return {"first_batch_s": first - start, "tokens_per_s": real / seconds,
          "rows_per_s": args.batches * args.batch_size / seconds,
          "packing_efficiency": real / slots}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--json", default=str(HERE / "data_throughput.json"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = Tokenizer(train_sentencepiece(DATA / "tokenizer_corpus.txt", f"{tmp}/t", 1000))
  results = []
  print(f"seq_len {args.seq_len}, batch {args.batch_size}, {args.batches} timed batches, "
        f"shuffle {args.shuffle}")
  print(f"{'data':<16} {'packing':<10} {'workers':>7} {'first batch s':>13} {'tokens/s':>10} "
        f"{'rows/s':>8} {'efficiency':>10}")
  for name, source, fmt, packing in CASES:
    for workers in WORKERS:
      r = measure(tokenizer, source, fmt, packing, workers, args)
      results.append({"data": name, "packing": packing, "workers": workers, **r})
      print(f"{name:<16} {packing:<10} {workers:>7} {r['first_batch_s']:>13.2f} "
            f"{r['tokens_per_s']:>10,.0f} {r['rows_per_s']:>8.1f} "
            f"{r['packing_efficiency']:>10.1%}")
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k != "json"}
  out.write_text(json.dumps({"config": settings, "results": results}, indent=1) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
