"""python -m gemma_jax.lora merge --adapters WORKDIR [--base DIR] --out DIR: fold a LoRA run's
adapters into its base and save a plain model directory."""

from __future__ import annotations

import argparse
import sys

from gemma_jax import exits
from gemma_jax.model_dir import merge_lora_run


@exits.command("gemma_jax.lora")
def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m gemma_jax.lora",
                                   description="LoRA adapters: merge into the base model.")
  sub = parser.add_subparsers(dest="command", required=True)
  m = sub.add_parser("merge", help="fold a LoRA run's adapters into its base; save a model dir")
  m.add_argument("--adapters", required=True, help="the LoRA run's workdir (lora.json, "
                 "checkpoints/)")
  m.add_argument("--base", default=None, help="the base model directory (default: the one "
                 "recorded in lora.json)")
  m.add_argument("--out", required=True, help="the merged model directory to write")
  m.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  m.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    out = merge_lora_run(args.base, args.adapters, args.out, args.step, args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    raise exits.UsageError(exits.describe(e)) from e  # a flag's directory at fault
  print(f"merged model written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
