"""Writes the small RLHF demo sets next to this file (deterministic; rerun to reproduce).

  python configs/data/make_rlhf_sets.py

The task: answer arithmetic questions with digits. Every record is computed here.
- reward_pairs_train.jsonl / reward_pairs_heldout.jsonl (256 / 64 pairs, disjoint questions):
  the same answer written with digits (chosen) and in words (rejected), e.g. "It is 19." vs
  "It is nineteen.": a reward model must learn to prefer digits (configs/reward_tiny.py).
- rlhf_prompts.jsonl (64 prompts with the `answer` field): the prompts of configs/rlhf_tiny.py,
  whose reward (gemma_jax.rewards.digits_answer) pays for digits and for the right answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
FRAMES = ["{}", "It is {}.", "The answer is {}.", "{}, I think.", "That makes {}."]


def words(n: int) -> str:
  if n < 0:
    return "minus " + words(-n)
  if n < 20:
    return ONES[n]
  if n < 100:
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
  rest = n % 100
  return ONES[n // 100] + " hundred" + ("" if not rest else " and " + words(rest))


def questions(rng: random.Random) -> list[tuple[str, int]]:
  """Every distinct question once, shuffled: a + b and a - b for a, b in 1..49."""
  out = [(f"What is {a} {op} {b}?", a + b if op == "+" else a - b)
         for a in range(1, 50) for b in range(1, 50) for op in "+-"]
  rng.shuffle(out)
  return out


def pair(question: str, value: int, rng: random.Random) -> dict:
  frame = rng.choice(FRAMES)
  return {"prompt": question, "chosen": frame.format(value),
          "rejected": frame.format(words(value))}


def write_jsonl(path: Path, records: list[dict]) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(out_dir: Path = HERE) -> None:
  rng = random.Random(9)
  qs = questions(rng)
  write_jsonl(out_dir / "reward_pairs_train.jsonl", [pair(q, v, rng) for q, v in qs[:256]])
  write_jsonl(out_dir / "reward_pairs_heldout.jsonl",
              [pair(q, v, rng) for q, v in qs[256:320]])
  write_jsonl(out_dir / "rlhf_prompts.jsonl",
              [{"id": i, "prompt": q, "answer": str(v)} for i, (q, v) in enumerate(qs[320:384])])


if __name__ == "__main__":
  main()
