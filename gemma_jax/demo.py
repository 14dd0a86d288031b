"""CPU demo of the model until the trainer lands: tokenizer, forward pass, greedy sample.

  python -m gemma_jax.demo [--model tiny_gemma3] [--max_new_tokens 16]

Trains a small SentencePiece tokenizer on the shipped text, initialises a random model of
the chosen preset, runs one forward pass over a chat prompt and greedily extends it. The
weights are random, so the continuation is noise: the point is that every piece runs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.config import get_config
from gemma_jax.model import init_model, param_count
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_corpus.txt"


def greedy_extend(model, prompt: list[int], max_new_tokens: int) -> list[int]:
  """Greedy decoding by re-running the whole (fixed-size) buffer each step: no KV cache.

  Slots not yet generated carry segment id 0, so the model treats them as padding.
  """
  graphdef, state = nnx.split(model)
  total = len(prompt) + max_new_tokens
  tokens = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))

  @jax.jit
  def step(state, tokens, length):
    live = (jnp.arange(total) < length)[None].astype(jnp.int32)
    logits = nnx.merge(graphdef, state)(tokens, segment_ids=live)
    next_token = jnp.argmax(logits[0, length - 1])
    return tokens.at[0, length].set(next_token)

  for length in range(len(prompt), total):
    tokens = step(state, tokens, length)
  return np.asarray(tokens[0, len(prompt):]).tolist()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny_gemma3")
  parser.add_argument("--max_new_tokens", type=int, default=16)
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = Tokenizer(train_sentencepiece([CORPUS], f"{tmp}/demo", vocab_size=512))
  cfg = get_config(args.model, vocab_size=tokenizer.vocab_size)
  print(f"model {cfg.name}: {param_count(cfg):,} parameters, {cfg.num_layers} layers "
        f"{cfg.layer_kinds()}, compute dtype {cfg.dtype}, devices {jax.devices()}")
  model = init_model(cfg, seed=0)

  prompt = tokenizer.encode_chat([{"role": "user", "content": "How does the brain work?"}])
  start = time.perf_counter()
  logits = model(jnp.asarray([prompt]))
  print(f"forward pass: {len(prompt)} prompt tokens -> logits {logits.shape} {logits.dtype}, "
        f"finite={bool(jnp.isfinite(logits).all())}, {time.perf_counter() - start:.2f}s")

  start = time.perf_counter()
  new_tokens = greedy_extend(model, prompt, args.max_new_tokens)
  print(f"greedy sample of {len(new_tokens)} tokens in {time.perf_counter() - start:.2f}s "
        "(random weights, so expect noise):")
  print("  prompt:", repr(tokenizer.decode(prompt)))
  print("  sample:", repr(tokenizer.decode(new_tokens)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
