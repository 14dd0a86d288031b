"""lm-evaluation-harness's command line with the `gemma_jax` model registered.

  python -m gemma_jax.eval.lm_eval_cli --model gemma_jax --model_args checkpoint=DIR \
      --tasks TASKS [--include_path DIR] [any other lm_eval flag]

lm_eval 0.4 has no plugin discovery for models: a model exists once the module that
registers it is imported, which a bare `lm_eval` never does. Needs `pip install
'gemma-jax[lm_eval]'`.
"""

import sys

from gemma_jax import exits


@exits.command("gemma_jax.eval.lm_eval_cli")
def main(argv: list[str]) -> int:
  from lm_eval.__main__ import cli_evaluate

  import gemma_jax.eval.lm_eval_adapter  # noqa: F401  (registers "gemma_jax")

  sys.argv = [sys.argv[0], *argv]
  cli_evaluate()
  return 0


if __name__ == "__main__":
  sys.exit(main())
