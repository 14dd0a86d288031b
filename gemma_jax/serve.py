"""HTTP server for a model directory: seed `/score`, OpenAI-style completions and chat.

  python -m gemma_jax.serve --checkpoint DIR [--host 127.0.0.1 --port 8000]

Routes: POST /score, POST /v1/completions, POST /v1/chat/completions (both OpenAI routes
stream with `"stream": true`), GET /health. Formats and errors: gemma_jax/serving/api.py.
Requests arriving within --batch_wait_ms of each other are generated as one batch.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from gemma_jax import exits
from gemma_jax.model_dir import load_model_dir
from gemma_jax.sampler import Sampler
from gemma_jax.serving.api import DEFAULT_MAX_BODY_BYTES, create_app
from gemma_jax.serving.engine import Engine
from gemma_jax.tokenizer import Tokenizer


def build_app(checkpoint: str, *, dtype: str | None = None, max_batch: int = 16,
              max_queue: int = 64, batch_wait_ms: float = 10.0,
              max_new_tokens_limit: int = 1024, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
  """(app, engine) for a model directory; the caller starts and stops the engine."""
  overrides = {"dtype": dtype} if dtype else {}
  cfg, model, tokenizer_path = load_model_dir(checkpoint, **overrides)
  if tokenizer_path is None:
    raise ValueError(f"{checkpoint}: no tokenizer.model; the server needs one")
  engine = Engine(Sampler(model, Tokenizer(tokenizer_path)), max_batch=max_batch,
                  max_queue=max_queue, batch_wait_s=batch_wait_ms / 1000)
  app = create_app(engine, model_name=cfg.name, max_new_tokens_limit=max_new_tokens_limit,
                   max_body_bytes=max_body_bytes)
  return app, engine


@exits.command("gemma_jax.serve")
def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="model directory")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="compute dtype override")
  parser.add_argument("--max_batch", type=int, default=16, help="rows generated together")
  parser.add_argument("--max_queue", type=int, default=64,
                      help="requests waiting for a batch before 503")
  parser.add_argument("--batch_wait_ms", type=float, default=10.0,
                      help="how long a batch waits for more requests")
  parser.add_argument("--max_new_tokens_limit", type=int, default=1024)
  parser.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                      help="larger request bodies get 413 unread")
  args = parser.parse_args(argv)
  try:
    app, engine = build_app(args.checkpoint, dtype=args.dtype, max_batch=args.max_batch,
                            max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms,
                            max_new_tokens_limit=args.max_new_tokens_limit,
                            max_body_bytes=args.max_body_bytes)
  except (FileNotFoundError, ValueError) as e:
    raise exits.UsageError(exits.describe(e)) from e  # --checkpoint at fault
  engine.start()
  try:
    uvicorn.run(app, host=args.host, port=args.port)
  finally:
    engine.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
