"""RLHF rollout speed of the tiny demo as 1 process x 8 CPU devices and as 2 emulated hosts
x 4 devices (launch.local, gloo), side by side in one run.

  python -m benchmarks.rollout [--steps 12] [--json runs/rollout.json]

Each layout runs `trainers.rlhf --config configs/rlhf_tiny.py` (8 prompts x 4 completions of
up to 8 tokens per step) for --steps steps; the table shows the median over the steps after
the second (compilation excluded) of the trainer's own rollout_tokens_per_s (generated tokens
over the time from the start of sampling to the last token) and learner_tokens_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"1 x 8": (1, 8), "2 x 4": (2, 4)}


def run(processes: int, devices: int, steps: int, workdir: Path) -> dict[str, float]:
  trainer = [sys.executable, "-m", "trainers.rlhf", "--config", "configs/rlhf_tiny.py",
             f"--config.train.steps={steps}", "--config.logging.every=1",
             "--config.logging.console=False", "--config.logging.tensorboard=False",
             "--config.checkpoint.every=1000", "--workdir", str(workdir)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if processes == 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = trainer
  else:
    command = [sys.executable, "-m", "launch.local", "--processes", str(processes),
               "--devices-per-process", str(devices), "--", *trainer]
  subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  timed = [r for r in records if r["step"] > 2 and "rollout_tokens_per_s" in r]
  return {key: float(np.median([r[key] for r in timed]))
          for key in ("rollout_tokens_per_s", "learner_tokens_per_s")}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--json", default="runs/rollout.json")
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, (processes, devices) in LAYOUTS.items():
      rows.append({"layout": name, "processes": processes, "devices_per_process": devices,
                   **run(processes, devices, args.steps, Path(tmp) / name.replace(" ", ""))})
  print(f"{'layout':<8} {'rollout tokens/s':>17} {'learner tokens/s':>17}")
  for r in rows:
    print(f"{r['layout']:<8} {r['rollout_tokens_per_s']:>17,.0f} "
          f"{r['learner_tokens_per_s']:>17,.0f}")
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
