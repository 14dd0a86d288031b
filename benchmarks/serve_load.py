"""The HTTP server under load: the continuous engine against the static batcher, one run.

  python benchmarks/serve_load.py [--models tiny gemma3_270m] [--clients 16 32 64]
      [--requests 96] [--max_batch 16] [--steps_per_dispatch 8] [--max_passes 8]
      [--json benchmarks/serve_load.json]

For each model, both engines serve on 127.0.0.1 (uvicorn in this process, as the tests do)
and N closed-loop clients (threads of a separate load process, each sending its next request
when its last one is answered) share
a fixed list of requests: mixed prompts (most 4-30 tokens, a quarter 64-100) and budgets
(most 8-32 new tokens, a quarter 96-128), greedy, streamed. Reported per engine and N:
throughput (generated tokens / wall time, tokens read from /metrics), p50/p95 time to first
token (the first streamed event) and p50/p95 total latency. Every response is checked
against the same request run alone (Sampler.generate of that one prompt): a lost or mixed-up
request shows as a mismatch. An engine serves the whole list again and again, at most
--max_passes times, until a pass compiles nothing new (the static batcher compiles per batch,
width and budget bucket, and its batches form by timing; the continuous engine is warmed up
first); that pass is the one reported, with its number and the compilations it met (0: no
compile time in its figures).

Models (random weights, float32): `tiny` is tiny_gemma3 (7 layers, d=64); `gemma3_270m` is
that preset's shape (18 layers, d=640, 4 query heads / 1 kv head of 256, MLP 2048, window 512)
with the vocabulary of the tokenizer trained here from the test corpus (1000 pieces, not
262,144: no real tokenizer can be downloaded, and every sampled id must decode).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import uvicorn
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma_jax.checkpoint import save_model_dir  # noqa: E402
from gemma_jax.config import get_config  # noqa: E402
from gemma_jax.model import init_model  # noqa: E402
from gemma_jax.sampler import Sampler, SamplingParams  # noqa: E402
from gemma_jax.serve import build_app  # noqa: E402
from gemma_jax.serving.continuous import DEFAULT_STEPS_PER_DISPATCH  # noqa: E402
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "tokenizer_corpus.txt"
VOCAB = 1000
MODELS = {"tiny": "tiny_gemma3", "gemma3_270m": "gemma3_270m"}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
compilations = [0]  # backend compilations in this process so far
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_: compilations.__setitem__(0, compilations[0] + (
        event == COMPILE_EVENT)))


def model_dir(name: str, tmp: Path) -> Path:
  spm = train_sentencepiece([CORPUS], tmp / "spm", VOCAB)
  cfg = get_config(MODELS[name], dtype="float32", vocab_size=VOCAB, max_seq_len=256)
  return save_model_dir(tmp / name, cfg, init_model(cfg, seed=0), tokenizer_model=spm)


def workload(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[tuple[str, int]]:
  """(prompt text, max_tokens) pairs: most short, a quarter long, in a seeded order."""
  rng = np.random.default_rng(seed)
  ids = tokenizer.encode(CORPUS.read_text())
  out = []
  for i in range(n):
    long = rng.random() < 0.25
    length = int(rng.integers(64, 101) if long else rng.integers(4, 31))
    start = int(rng.integers(0, len(ids) - length))
    text = tokenizer.decode(ids[start:start + length]).strip() or "bread"
    budget = int(rng.integers(96, 129) if rng.random() < 0.25 else rng.integers(8, 33))
    out.append((text, budget))
  return out


class Server:
  """One engine serving on a free 127.0.0.1 port in a thread."""

  def __init__(self, directory: Path, engine: str, max_batch: int, steps_per_dispatch: int):
    self.app, self.engine = build_app(str(directory), engine=engine, max_batch=max_batch,
                                      max_queue=256, max_new_tokens_limit=256,
                                      request_timeout_s=0,
                                      steps_per_dispatch=steps_per_dispatch)
    self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                log_level="warning"))

  def __enter__(self) -> Server:
    self.engine.warm_up()
    self.engine.start()
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    self.port = self.server.servers[0].sockets[0].getsockname()[1]
    return self

  def __exit__(self, *_) -> None:
    self.server.should_exit = True
    self.thread.join(60)
    self.engine.stop()

  def generated_tokens(self) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("gemma_generation_tokens_total "))


def stream(port: int, prompt: str, max_tokens: int) -> tuple[str, float, float]:
  """(text, time to first event, total time) of one streamed greedy completion."""
  start = time.perf_counter()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  conn.request("POST", "/v1/completions", json.dumps({
      "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}),
      {"Content-Type": "application/json"})
  response = conn.getresponse()
  if response.status != 200:
    raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
  text, first = [], None
  for line in response:
    if not line.startswith(b"data: "):
      continue
    first = first or time.perf_counter() - start
    data = line[6:].strip()
    if data == b"[DONE]":
      break
    event = json.loads(data)
    if "error" in event:
      raise RuntimeError(event["error"]["message"])
    text.append(event["choices"][0]["text"])
  conn.close()
  return "".join(text), first, time.perf_counter() - start


def clients_run(port: int, requests: list[tuple[str, int]], clients: int
                ) -> tuple[list[tuple[str, float, float]], float]:
  """(stream() of each request, wall time) with `clients` closed-loop client threads; runs in
  the load process."""
  todo = iter(range(len(requests)))
  lock = threading.Lock()
  results: list[tuple[str, float, float] | None] = [None] * len(requests)

  def client() -> None:
    while True:
      with lock:
        i = next(todo, None)
      if i is None:
        return
      results[i] = stream(port, *requests[i])

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for future in [pool.submit(client) for _ in range(clients)]:
      future.result()
  return results, time.perf_counter() - start


def load(server: Server, requests: list[tuple[str, int]], clients: int,
         loader: concurrent.futures.Executor) -> dict:
  """Serve every request with `clients` closed-loop clients in the load process (their
  threads do not share the server's GIL, as with a real load generator); latencies and
  throughput."""
  tokens = server.generated_tokens()
  results, wall = loader.submit(clients_run, server.port, requests, clients).result()
  tokens = server.generated_tokens() - tokens
  ttft = [r[1] for r in results]
  total = [r[2] for r in results]
  pct = lambda xs, q: float(np.percentile(xs, q))
  return {"texts": [r[0] for r in results], "wall_s": wall, "generated_tokens": int(tokens),
          "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50),
          "ttft_p95_s": pct(ttft, 95), "latency_p50_s": pct(total, 50),
          "latency_p95_s": pct(total, 95)}


def bench_model(name: str, args, loader: concurrent.futures.Executor) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    directory = model_dir(name, Path(tmp))
    for engine in ("static", "continuous"):
      with Server(directory, engine, args.max_batch, args.steps_per_dispatch) as server:
        sampler = server.engine.sampler
        requests = workload(sampler.tokenizer, args.requests)
        if engine == "static":  # each request alone: the reference
          started = time.perf_counter()
          # One prompt width for all (min_width): fewer compilations, the same tokens.
          alone = Sampler(nnx.merge(sampler.graphdef, sampler.params), sampler.tokenizer,
                          min_width=128)
          want = [alone.generate([p], SamplingParams(max_new_tokens=n))[0].text
                  for p, n in requests]
          print(f"{name}: {len(requests)} references alone in "
                f"{time.perf_counter() - started:.0f} s", flush=True)
        for clients in args.clients:
          for passes in range(1, args.max_passes + 1):  # the first that meets no new shape
            before = compilations[0]
            result = load(server, requests, clients, loader)
            if compilations[0] == before:
              break
          texts = result.pop("texts")
          result.update(model=name, engine=engine, clients=clients, max_batch=args.max_batch,
                        requests=len(requests), passes=passes,
                        compilations=compilations[0] - before,
                        mismatches=sum(a != b for a, b in zip(texts, want)))
          rows.append(result)
          print(_row(result), flush=True)
  return rows


def _row(r: dict) -> str:
  return (f"| {r['model']} | {r['engine']} | {r['clients']} | {r['tokens_per_s']:,.0f} | "
          f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['latency_p50_s']:.2f} | "
          f"{r['latency_p95_s']:.2f} | {r['mismatches']} | {r['compilations']} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
  parser.add_argument("--clients", nargs="+", type=int, default=[16, 32, 64])
  parser.add_argument("--requests", type=int, default=96)
  parser.add_argument("--max_batch", type=int, default=16)
  parser.add_argument("--steps_per_dispatch", type=int, default=DEFAULT_STEPS_PER_DISPATCH,
                      help="the continuous engine's decode steps per device call")
  parser.add_argument("--max_passes", type=int, default=8,
                      help="passes over the request list at most per engine and client count")
  parser.add_argument("--json", default=str(ROOT / "benchmarks" / "serve_load.json"))
  args = parser.parse_args()
  print("| model | engine | clients | tokens/s | TTFT p50 s | TTFT p95 s | latency p50 s "
        "| latency p95 s | mismatches | compilations |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        flush=True)
  spawn = multiprocessing.get_context("spawn")  # a fresh process: no JAX threads forked
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as loader:
    rows = [r for name in args.models for r in bench_model(name, args, loader)]
  summary = []
  for name in args.models:
    for clients in args.clients:
      pick = {r["engine"]: r for r in rows if r["model"] == name and r["clients"] == clients}
      summary.append({"model": name, "clients": clients,
                      "throughput_ratio": pick["continuous"]["tokens_per_s"]
                      / pick["static"]["tokens_per_s"],
                      "ttft_p95_ratio": pick["continuous"]["ttft_p95_s"]
                      / pick["static"]["ttft_p95_s"]})
      ratios = summary[-1]
      print(f"{name} x{clients}: continuous / static throughput "
            f"{ratios['throughput_ratio']:.2f}x, p95 TTFT {ratios['ttft_p95_ratio']:.2f}x")
  run = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
         "machine": platform.machine(), "cpus": os.cpu_count(),
         "steps_per_dispatch": args.steps_per_dispatch, "rows": rows,
         "continuous_vs_static": summary}
  save_run(Path(args.json), run)


def save_run(path: Path, run: dict, keep: int = 4) -> None:
  """Add the run to the file's "runs" (the last `keep`; RESULTS.md quotes several runs, and
  the static batcher's figures vary from run to run)."""
  runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
  path.write_text(json.dumps({"runs": [*runs, run][-keep:]}, indent=1) + "\n")


if __name__ == "__main__":
  main()
