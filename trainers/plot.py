"""Loss curves of a run: python -m trainers.plot WORKDIR [--out FILE.png]

Reads WORKDIR/metrics.jsonl and writes WORKDIR/loss.png (or --out): training and eval loss
against the step, and the learning rate below; reward-model, RLHF and DPO runs get a panel
of their accuracy / mean reward (and KL to the reference) in between. A resumed run logs again the steps after its
checkpoint; the last record of a step wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemma_jax import exits
from gemma_jax.metrics import METRICS_FILE

PLOT_FILE = "loss.png"
# Plotted in a panel of their own when a run logs them (python -m trainers.reward / rlhf).
TASK_METRICS = ("reward_mean", "accuracy", "eval_accuracy", "reward_accuracy",
                "eval_reward_accuracy", "kl")


def read_metrics(workdir: str | Path) -> dict[str, list[tuple[int, float]]]:
  """{metric: [(step, value), ...] sorted by step}; the last record of a step wins."""
  path = Path(workdir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; is {workdir} a trainer workdir?")
  by_key: dict[str, dict[int, float]] = {}
  for line in path.read_text().splitlines():
    record = json.loads(line)
    step = record.pop("step")
    for key, value in record.items():
      if value is not None:
        by_key.setdefault(key, {})[step] = value
  return {k: sorted(v.items()) for k, v in by_key.items()}


def plot(workdir: str | Path, out: str | Path | None = None) -> Path:
  import matplotlib

  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  metrics = read_metrics(workdir)
  if "loss" not in metrics:
    raise ValueError(f"{Path(workdir) / METRICS_FILE}: no loss recorded yet")
  out = Path(out) if out else Path(workdir) / PLOT_FILE
  task = [k for k in TASK_METRICS if k in metrics]
  if task:  # reward model / RLHF runs: their own curves between loss and learning rate
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 8), sharex=True,
                                              gridspec_kw={"height_ratios": [2, 2, 1]})
    _plot_task(middle, metrics, task)
  else:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
  for key, label in (("loss", "train"), ("eval_loss", "eval")):
    if key in metrics:
      steps, values = zip(*metrics[key])
      top.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
  top.set_ylabel("loss (nats / token)")
  top.set_title(f"{Path(workdir).absolute().name}")
  top.grid(alpha=0.3)
  top.legend()
  if "learning_rate" in metrics:
    steps, values = zip(*metrics["learning_rate"])
    bottom.plot(steps, values, color="gray")
  bottom.set_ylabel("learning rate")
  bottom.set_xlabel("step")
  bottom.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def _plot_task(ax, metrics, keys) -> None:
  """Reward / accuracy curves on the left axis, the KL (RLHF) on a right-hand one."""
  for key in keys:
    if key == "kl":
      continue
    steps, values = zip(*metrics[key])
    ax.plot(steps, values, marker="o" if key.startswith("eval_") else None,
            label=key.replace("_", " "))
  ax.set_ylabel("reward / accuracy")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  if "kl" in keys:
    right = ax.twinx()
    steps, values = zip(*metrics["kl"])
    right.plot(steps, values, color="tab:red", linestyle="--", label="KL to reference")
    right.set_ylabel("KL (nats / completion)", color="tab:red")
    right.legend(loc="lower right")


@exits.command("trainers.plot")
def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--out", help=f"PNG file (default: WORKDIR/{PLOT_FILE})")
  args = parser.parse_args(argv)
  try:
    print(plot(args.workdir, args.out))
  except ImportError as e:
    parser.error(f"{e}: pip install matplotlib")
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())
