"""Generate text from a model directory with the KV-cache sampler.

  python -m gemma_jax.generate --checkpoint DIR --prompt "..." [--prompt "..."] [--chat]
      [--temperature 0 --top_p 1 --top_k 0 --max_new_tokens 64 --seed 0 --stop STR] [--json]

Several --prompt flags run as one batch. --chat wraps each prompt as a user turn of the
Gemma chat template. Prints each continuation (with a `### prompt i` header when there are
several), or with --json one object per prompt: text, tokens, logprobs, finish_reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from gemma_jax.model_dir import load_model_dir
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="model directory")
  parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  parser.add_argument("--chat", action="store_true", help="apply the chat template")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0, help="0 = no limit")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="compute dtype override")
  parser.add_argument("--json", action="store_true", help="print JSON lines")
  return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  parser, args = parse_args(argv)
  try:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop=tuple(args.stop))
    cfg, model, tokenizer_path = load_model_dir(args.checkpoint,
                                                **({"dtype": args.dtype} if args.dtype else {}))
    if tokenizer_path is None:
      raise ValueError(f"{args.checkpoint}: no tokenizer.model in the model directory")
    tokenizer = Tokenizer(tokenizer_path)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) if args.chat
               else tokenizer.encode(p, add_bos=True) for p in args.prompt]
    completions = Sampler(model, tokenizer).generate(prompts, params)
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  for i, (prompt, c) in enumerate(zip(args.prompt, completions)):
    if args.json:
      print(json.dumps({"prompt": prompt, "text": c.text, "tokens": c.tokens,
                        "logprobs": c.logprobs, "finish_reason": c.finish_reason}))
    else:
      print(f"### prompt {i}\n{c.text}" if len(completions) > 1 else c.text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
