"""CPU demo of the model until the trainer lands: tokenizer, forward pass, greedy sample.

  python -m gemma_jax.demo [--model tiny_gemma3] [--max_new_tokens 16]

Trains a small SentencePiece tokenizer on the shipped text, initialises a random model of
the chosen preset, runs one forward pass over a chat prompt and greedily extends it with the
KV-cache sampler. The weights are random, so the continuation is noise: the point is that
every piece runs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from gemma_jax import exits
from gemma_jax.config import get_config
from gemma_jax.model import init_model, param_count
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_corpus.txt"


@exits.command("gemma_jax.demo")
def main(argv: list[str]) -> int:
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
  sampler = Sampler(model, tokenizer)
  completion = sampler.generate([prompt], SamplingParams(max_new_tokens=args.max_new_tokens))[0]
  print(f"greedy sample of {len(completion.tokens)} tokens ({completion.finish_reason}) in "
        f"{time.perf_counter() - start:.2f}s with the KV-cache sampler, compilation included "
        "(random weights, so expect noise):")
  print("  prompt:", repr(tokenizer.decode(prompt)))
  print("  sample:", repr(tokenizer.decode(completion.tokens)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
