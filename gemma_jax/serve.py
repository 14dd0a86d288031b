"""HTTP server for a model directory: seed `/score`, OpenAI-style completions and chat.

  python -m gemma_jax.serve --checkpoint DIR [--host 127.0.0.1 --port 8000]
      [--engine continuous|static --max_batch 16 --request_timeout_s 600]

Routes: POST /score, POST /v1/completions, POST /v1/chat/completions (both OpenAI routes
stream with `"stream": true`), GET /health, GET /metrics (Prometheus text format). Formats and
errors: gemma_jax/serving/api.py.

--engine continuous (the default, gemma_jax/serving/continuous.py) decodes --max_batch slots
together and lets requests join and leave between any two decode steps: a waiting prompt is
prefilled (in chunks of --prefill_chunk tokens; short prompts waiting together in one call)
into a free slot while the others keep decoding, and a finished or cancelled row frees its
slot at once (--warm_up: compile every prefill shape first); each device call decodes
up to --steps_per_dispatch tokens per slot (one while a free slot could take a waiting
prompt; the call ends when a slot finishes while others wait). Each slot holds
--cache_len positions (prompt + new tokens; default: the model's context). --engine static
(gemma_jax/serving/engine.py) generates the requests arriving within --batch_wait_ms of each
other as one batch that runs to completion. Both queue at most --max_queue requests (then
503 + Retry-After); a request not finished --request_timeout_s after it arrived ends with 504
(0: no timeout); a client that disconnects cancels its request.
"""

from __future__ import annotations

import argparse
import sys
import time

import uvicorn

from gemma_jax import exits
from gemma_jax.model_dir import load_model_dir
from gemma_jax.sampler import Sampler
from gemma_jax.serving.api import DEFAULT_MAX_BODY_BYTES, DEFAULT_TIMEOUT_S, create_app
from gemma_jax.serving.continuous import (
  DEFAULT_PREFILL_CHUNK,
  DEFAULT_STEPS_PER_DISPATCH,
  ContinuousEngine,
)
from gemma_jax.serving.engine import BaseEngine, Engine
from gemma_jax.tokenizer import Tokenizer

ENGINES = ("continuous", "static")


def build_app(checkpoint: str, *, dtype: str | None = None, engine: str = "continuous",
              max_batch: int = 16, max_queue: int = 64, batch_wait_ms: float = 10.0,
              cache_len: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
              steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH,
              max_new_tokens_limit: int = 1024, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              request_timeout_s: float | None = DEFAULT_TIMEOUT_S):
  """(app, engine) for a model directory; the caller starts and stops the engine."""
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  overrides = {"dtype": dtype} if dtype else {}
  cfg, model, tokenizer_path = load_model_dir(checkpoint, **overrides)
  if tokenizer_path is None:
    raise ValueError(f"{checkpoint}: no tokenizer.model; the server needs one")
  sampler = Sampler(model, Tokenizer(tokenizer_path))
  worker: BaseEngine
  if engine == "continuous":
    worker = ContinuousEngine(sampler, max_batch=max_batch, max_queue=max_queue,
                              cache_len=cache_len, prefill_chunk=prefill_chunk,
                              steps_per_dispatch=steps_per_dispatch)
  else:
    worker = Engine(sampler, max_batch=max_batch, max_queue=max_queue,
                    batch_wait_s=batch_wait_ms / 1000)
  app = create_app(worker, model_name=cfg.name, max_new_tokens_limit=max_new_tokens_limit,
                   max_body_bytes=max_body_bytes, timeout_s=request_timeout_s)
  return app, worker


@exits.command("gemma_jax.serve")
def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="model directory")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="compute dtype override")
  parser.add_argument("--engine", choices=ENGINES, default="continuous",
                      help="continuous: rows join and leave at every decode step; static: "
                      "batches of requests that arrive together, run to completion")
  parser.add_argument("--max_batch", type=int, default=16,
                      help="rows generated together (continuous: decode slots)")
  parser.add_argument("--max_queue", type=int, default=64,
                      help="requests waiting to start before 503")
  parser.add_argument("--batch_wait_ms", type=float, default=10.0,
                      help="static: how long a batch waits for more requests")
  parser.add_argument("--cache_len", type=int,
                      help="continuous: positions per slot, prompt + new tokens (default: the "
                      "model's context)")
  parser.add_argument("--prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                      help="continuous: prompt tokens read between two decode steps")
  parser.add_argument("--steps_per_dispatch", type=int, default=DEFAULT_STEPS_PER_DISPATCH,
                      help="continuous: decode steps per device call (a new request waits "
                      "at most this many)")
  parser.add_argument("--warm_up", action="store_true",
                      help="continuous: compile every prefill group shape and the decode step "
                      "before serving (no request then waits for a compilation)")
  parser.add_argument("--request_timeout_s", type=float, default=DEFAULT_TIMEOUT_S,
                      help="a request not finished this long after it arrived gets 504 "
                      "(0: never)")
  parser.add_argument("--max_new_tokens_limit", type=int, default=1024)
  parser.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                      help="larger request bodies get 413 unread")
  args = parser.parse_args(argv)
  try:
    app, engine = build_app(args.checkpoint, dtype=args.dtype, engine=args.engine,
                            max_batch=args.max_batch, max_queue=args.max_queue,
                            batch_wait_ms=args.batch_wait_ms, cache_len=args.cache_len,
                            prefill_chunk=args.prefill_chunk,
                            steps_per_dispatch=args.steps_per_dispatch,
                            max_new_tokens_limit=args.max_new_tokens_limit,
                            max_body_bytes=args.max_body_bytes,
                            request_timeout_s=args.request_timeout_s)
  except (FileNotFoundError, ValueError) as e:
    raise exits.UsageError(exits.describe(e)) from e  # --checkpoint at fault
  if args.warm_up and args.engine == "static":
    print("--warm_up: nothing to compile ahead for --engine static (each batch shape "
          "compiles when first met)", flush=True)
  elif args.warm_up:
    started = time.perf_counter()
    shapes = engine.warm_up()
    print(f"warmed up: {shapes} prefill shapes and the decode step compiled in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
  engine.start()
  try:
    uvicorn.run(app, host=args.host, port=args.port)
  finally:
    engine.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
