"""Convert Gemma checkpoints into model directories, and model directories into HF checkpoints.

  python -m gemma_jax.convert --from gguf gemma-3-270m.gguf --to models/g3
  python -m gemma_jax.convert --from official ~/kaggle/gemma2-2b-it --to models/g2
  python -m gemma_jax.convert --from hf ~/hf/gemma-2-2b --to models/g2
  python -m gemma_jax.convert --from model models/g3 --to-hf hf/g3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from gemma_jax import exits
from gemma_jax.config import preset_names
from gemma_jax.convert import FORMATS, export_hf, import_checkpoint

MODEL_DIR = "model"  # --from model DIR: an existing model directory (for --to-hf)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m gemma_jax.convert",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--from", dest="source", nargs=2, required=True, metavar=("FORMAT", "SRC"),
                      help=f"FORMAT is one of {', '.join(FORMATS)} or {MODEL_DIR} (a model "
                           "directory); SRC a GGUF file, an HF or orbax checkpoint directory")
  parser.add_argument("--to", help="model directory to write (params, config.json, tokenizer)")
  parser.add_argument("--to-hf", help="also (or only, with --from model) write an HF checkpoint")
  parser.add_argument("--model", choices=preset_names(), metavar="PRESET",
                      help="use this preset instead of the config inferred from the source")
  parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--tokenizer", help="SentencePiece model to ship with the model directory")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --to")
  args = parser.parse_args(argv)
  fmt = args.source[0]
  if fmt not in (*FORMATS, MODEL_DIR):
    parser.error(f"--from: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}, {MODEL_DIR}")
  if fmt == MODEL_DIR and (args.to or not args.to_hf):
    parser.error("--from model reads a model directory: give --to-hf OUTDIR and no --to")
  if fmt != MODEL_DIR and not args.to:
    parser.error("--to DIR is required")
  return args


def _show_progress(log: logging.Logger) -> None:
  """Conversion notes (preset matched, tensors skipped) on stderr, also under absl's handler."""
  if not logging.root.handlers:
    logging.basicConfig(format="%(message)s")
  log.setLevel(logging.INFO)


@exits.command("gemma_jax.convert")
def main(argv: list[str]) -> int:
  args = parse_args(argv)
  _show_progress(logging.getLogger("gemma_jax.convert"))
  fmt, src = args.source
  model_dir = src
  if fmt != MODEL_DIR:
    start = time.perf_counter()
    cfg, model_dir = import_checkpoint(fmt, src, args.to, args.model, args.param_dtype,
                                       args.tokenizer, args.overwrite)
    tokenizer = (model_dir / "tokenizer.model").is_file()
    print(f"wrote {model_dir}: config {cfg.name!r}, {cfg.num_layers} layers, vocab "
          f"{cfg.vocab_size:,}, {cfg.param_dtype}, tokenizer {'yes' if tokenizer else 'NO'}, "
          f"{time.perf_counter() - start:.1f}s")
  if args.to_hf:
    start = time.perf_counter()
    out = export_hf(model_dir, args.to_hf)
    print(f"wrote {out} (HF transformers), {time.perf_counter() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
