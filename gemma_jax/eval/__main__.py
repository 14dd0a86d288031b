"""Evaluate a model directory on tasks: perplexity, multiple choice, generation.

  python -m gemma_jax.eval --checkpoint DIR --task NAME_OR_FILE [--task ...] [--limit N]
      [--max_length 2048 --batch_size 8 --dtype float32 --mesh data=1,fsdp=-1,tensor=1]
      [--output results.json] [--no_progress]

A task is a shipped name (python -m gemma_jax.eval --list), a .json spec or a .jsonl file
(gemma_jax/eval/tasks.py). Prints a table of every task's metrics and, with --output, writes
them as JSON ({task: {metric: value}} plus the settings).
"""

from __future__ import annotations

import argparse
import json
import sys

from gemma_jax import exits, sharding
from gemma_jax.eval.evaluate import Evaluator, run_tasks
from gemma_jax.eval.tasks import load_task, shipped
from gemma_jax.generate import parse_mesh
from gemma_jax.model_dir import load_model_dir
from gemma_jax.tokenizer import Tokenizer


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", help="model directory")
  parser.add_argument("--task", action="append", default=[], help="repeat for several")
  parser.add_argument("--list", action="store_true", help="print the shipped tasks")
  parser.add_argument("--limit", type=int, default=0, help="first N examples (0 = all)")
  parser.add_argument("--max_length", type=int, default=None,
                      help="tokens per row (default: the model's max_seq_len)")
  parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
  parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="compute dtype override")
  parser.add_argument("--mesh", default=None, help="shard the model, e.g. data=1,fsdp=-1,"
                      "tensor=1 (default: one device)")
  parser.add_argument("--output", default=None, help="write the results as JSON")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if not args.list and (not args.checkpoint or not args.task):
    parser.error("--checkpoint and at least one --task are required")
  if args.limit < 0 or args.batch_size < 1 or (args.max_length or 2) < 2:
    parser.error("--limit must be >= 0, --batch_size >= 1 and --max_length >= 2")
  return args


def table(results: dict[str, dict[str, float]]) -> str:
  """The results as a Markdown table: one row per (task, metric)."""
  lines = ["| task | metric | value |", "|---|---|---:|"]
  for task, metrics in results.items():
    lines += [f"| {task} | {name} | {value:.4f} |" for name, value in metrics.items()]
  return "\n".join(lines)


@exits.command("gemma_jax.eval")
def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.list:
    print("\n".join(shipped()))
    return 0
  tasks = [load_task(t) for t in args.task]  # bad task files fail before the model loads
  try:
    mesh = sharding.make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    _, model, tokenizer_path = load_model_dir(
        args.checkpoint, mesh, **({"dtype": args.dtype} if args.dtype else {}))
  except (FileNotFoundError, ValueError) as e:
    raise exits.UsageError(exits.describe(e)) from e  # a flag or --checkpoint at fault
  if tokenizer_path is None:
    raise exits.UsageError(f"{args.checkpoint}: no tokenizer.model in the model directory")
  evaluator = Evaluator(model, Tokenizer(tokenizer_path), mesh, max_length=args.max_length,
                        batch_size=args.batch_size, progress=not args.no_progress)
  results = run_tasks(evaluator, tasks, args.limit)
  print(table(results))
  if args.output:
    settings = {k: getattr(args, k) for k in ("checkpoint", "limit", "batch_size", "dtype",
                                               "mesh")}
    settings["max_length"] = evaluator.max_length
    with open(args.output, "w") as f:
      json.dump({"results": results, "settings": settings}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
