"""Per-chip memory of full SFT vs LoRA vs QLoRA, from AOT compiles of the real train step.

  python -m benchmarks.lora_fit [--models gemma_2b,gemma_7b] [--only pod|chip] [--full]
      [--out FILE.json]      # two --only runs in parallel, then --table A.json B.json

Compiles (launch/aot.py, libtpu's topology descriptions; no TPU used) the SFT step of each
model on a v5e:16x16 pod (configs/pod.py: 512 x 2048 tokens, fsdp 256, full remat) and on one
16 GiB v5e chip (v5e:1x1, 2 x 2048 tokens), and writes benchmarks/lora_fit.json. The
full-SFT pod rows are benchmarks/pod_fit.json's (the same program: the SFT step is the
pretraining step on chat batches) unless --full recompiles them. Each compile takes 3-6
minutes on a 2-core machine; every finished row is written at once.

Variants: full = float32 weights + AdamW moments (12 bytes/param); lora = rank 16 adapters
(float32, with moments) on all five weight kinds, frozen base in bfloat16; qlora = the same
with the base's matmul weights in NF4 (block 64, float32 scales), embeddings/norms bfloat16.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from benchmarks.pod_fit import run_aot

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "lora_fit.json"
LORA = ["--config.lora.rank=16", "--config.lora.alpha=32.0", "--config.model.param_dtype=bfloat16"]
VARIANTS = {"full": [], "lora": LORA, "qlora": LORA + ["--config.lora.quantize=nf4"]}
TOPOLOGIES = {
    "pod": ("v5e:16x16", []),
    "chip": ("v5e:1x1", ["--config.train.global_batch_size=2", "--config.train.seq_len=2048"]),
}


def cases(models: list[str], only: str | None, full: bool) -> list[tuple[str, str, str]]:
  out = []
  for where in ("pod", "chip"):
    if only and where != only:
      continue
    for model in models:
      for variant in VARIANTS:
        if variant == "full" and (where == "chip" or not full):
          continue
        out.append((model, variant, where))
  return out


def pod_fit_full_rows(models: list[str]) -> list[dict]:
  rows = json.loads((HERE / "pod_fit.json").read_text())
  return [dict(r, variant="full", where="pod", source="benchmarks/pod_fit.json")
          for r in rows if r.get("config") in models and r.get("topology") == "v5e:16x16"]


def table(rows: list[dict]) -> str:
  head = ("| model | variant | topology | tokens/step | per-chip peak GiB | fits 16 GiB | "
          "weights MiB/chip | trainable + Adam MiB/chip | compile s |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['config']} | {r['variant']} | {r['topology']} | - | - | "
                   f"error: {r['error']} | - | - | - |")
      continue
    sb = r.get("state_bytes_per_chip") or {}
    mib = lambda b: f"{b / 2**20:,.1f}"
    if "frozen" in sb:
      weights, trained = sb["frozen"], sb["params"] + sb["opt_state"]
    elif sb:
      weights, trained = sb["params"], sb["params"] + sb["opt_state"]
    else:  # pod_fit rows: float32 params + 2 moments, 1/256 each
      weights = r["per_chip_bytes"]["argument"] / 3
      trained = r["per_chip_bytes"]["argument"]
    lines.append(
        f"| {r['config']} | {r['variant']} | {r['topology']} | {r['global_batch_tokens']:,} | "
        f"{r['per_chip_gib']:.2f} | {'yes' if r['per_chip_gib'] <= 16 else 'NO'} | "
        f"{mib(weights)} | {mib(trained)} | {r['compile_seconds']} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="gemma_2b,gemma_7b")
  parser.add_argument("--only", choices=("pod", "chip"), default=None)
  parser.add_argument("--full", action="store_true", help="recompile the full-SFT pod rows")
  parser.add_argument("--out", default=str(OUT), help="JSON file for the rows")
  parser.add_argument("--table", nargs="*", default=None, metavar="JSON",
                      help="only print the table of these JSON files' rows (no compiles)")
  args = parser.parse_args()
  if args.table is not None:
    print(table([r for f in args.table for r in json.loads(pathlib.Path(f).read_text())]))
    return 0
  out = pathlib.Path(args.out)
  models = args.models.split(",")
  rows = [] if args.full or args.only == "chip" else pod_fit_full_rows(models)
  for model, variant, where in cases(models, args.only, args.full):
    topology, overrides = TOPOLOGIES[where]
    row = run_aot(model, topology, VARIANTS[variant] + overrides)
    rows.append(dict(row, variant=variant, where=where))
    print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
  out.write_text(json.dumps(rows, indent=1) + "\n")
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
