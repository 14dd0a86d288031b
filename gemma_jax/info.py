"""Print a preset's ModelConfig and parameter counts as JSON.

  python -m gemma_jax.info --model gemma_7b
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gemma_jax import exits
from gemma_jax.config import get_config, preset_names
from gemma_jax.model import param_count_breakdown


def model_info(name: str) -> dict:
  cfg = get_config(name)
  kinds = cfg.layer_kinds()
  return {"config": dataclasses.asdict(cfg),
          "layers_by_kind": {k: kinds.count(k) for k in ("local", "global")},
          "params": param_count_breakdown(cfg)}


@exits.command("gemma_jax.info")
def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, choices=preset_names(), metavar="PRESET",
                      help="one of: " + ", ".join(preset_names()))
  args = parser.parse_args(argv)
  json.dump(model_info(args.model), sys.stdout, indent=2)
  print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
