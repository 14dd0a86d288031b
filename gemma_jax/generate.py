"""Generate text from a model directory with the KV-cache sampler.

  python -m gemma_jax.generate --checkpoint DIR --prompt "..." [--prompt "..."] [--chat]
      [--temperature 0 --top_p 1 --top_k 0 --max_new_tokens 64 --seed 0 --stop STR] [--json]

Several --prompt flags run as one batch. --chat wraps each prompt as a user turn of the
Gemma chat template. Prints each continuation (with a `### prompt i` header when there are
several), or with --json one object per prompt: text, tokens, logprobs, finish_reason.

--mesh data=1,fsdp=-1,tensor=1 shards the model over the devices (the rule table of
gemma_jax.sharding) instead of using one. Several hosts (a model too large for one; every
host runs the same command, joined by --distributed on a TPU VM or by launch.local's
environment) always use a mesh, fsdp over all devices unless --mesh says otherwise: each host
samples its block of the prompts and process 0 prints them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

from gemma_jax import distributed, exits, sharding
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
  parser.add_argument("--mesh", default=None, help="shard the model, e.g. data=1,fsdp=-1,"
                      "tensor=1 (default: one device; with several hosts fsdp=-1)")
  parser.add_argument("--distributed", action="store_true", help="join a multi-host job "
                      "(auto-detected cluster; launch.local's environment joins without it)")
  return parser, parser.parse_args(argv)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=-1' -> the mesh config (unnamed axes 1)."""
  sizes = dict.fromkeys(sharding.MESH_AXES, 1)
  for item in text.split(","):
    name, _, value = item.partition("=")
    if name.strip() not in sizes:
      raise ValueError(f"--mesh {text!r}: unknown axis {name.strip()!r}; axes: "
                       f"{', '.join(sharding.MESH_AXES)}")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"--mesh {text!r}: {item!r} needs an integer size") from None
  return sizes


@exits.command("gemma_jax.generate")
def main(argv: list[str]) -> int:
  _, args = parse_args(argv)
  try:
    distributed.initialize(auto=args.distributed)
    completions = _generate(args)
  except (FileNotFoundError, ValueError, distributed.DistributedError) as e:
    raise exits.UsageError(exits.describe(e)) from e  # a flag or --checkpoint at fault
  if jax.process_index() != 0:
    return 0
  for i, (prompt, c) in enumerate(zip(args.prompt, completions)):
    if args.json:
      print(json.dumps({"prompt": prompt, "text": c["text"], "tokens": c["tokens"],
                        "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}))
    else:
      print(f"### prompt {i}\n{c['text']}" if len(completions) > 1 else c["text"])
  return 0


def _generate(args: argparse.Namespace) -> list[dict]:
  """Every prompt's completion as a dict (text, tokens, logprobs, finish_reason)."""
  params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop=tuple(args.stop))
  mesh_text = args.mesh or ("fsdp=-1" if jax.process_count() > 1 else None)
  mesh = sharding.make_mesh(parse_mesh(mesh_text)) if mesh_text else None
  cfg, model, tokenizer_path = load_model_dir(args.checkpoint, mesh,
                                              **({"dtype": args.dtype} if args.dtype else {}))
  if tokenizer_path is None:
    raise ValueError(f"{args.checkpoint}: no tokenizer.model in the model directory")
  tokenizer = Tokenizer(tokenizer_path)
  prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) if args.chat
             else tokenizer.encode(p, add_bos=True) for p in args.prompt]
  per_host = -(-len(prompts) // jax.process_count())  # each host samples its block of rows
  mine = prompts[jax.process_index() * per_host:][:per_host]
  completions = [dataclasses.asdict(c) for c in Sampler(model, tokenizer, mesh=mesh)
                 .generate(mine, params)]
  gathered = distributed.gather_bytes(json.dumps(completions).encode())
  return [c for data in gathered for c in json.loads(data)]


if __name__ == "__main__":
  sys.exit(main())
