"""Write the shipped evaluation tasks (specs + JSONL) in this directory, byte for byte.

  python gemma_jax/eval/tasks/make_tasks.py

Everything is generated here or written for this project (the perplexity set is the last
paragraphs of tests/data/tokenizer_corpus.txt): arithmetic as multiple choice and as
generation, word completion as multiple choice. Seeded, so reruns give the same files (a
test checks it). Edit this script, not its outputs.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from gemma_jax import exits

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[2] / "tests" / "data" / "tokenizer_corpus.txt"

WORDS = [  # (context, answer)
    ("The opposite of hot is", "cold"), ("The opposite of up is", "down"),
    ("The opposite of day is", "night"), ("The opposite of big is", "small"),
    ("The opposite of fast is", "slow"), ("The opposite of open is", "closed"),
    ("The opposite of happy is", "sad"), ("The opposite of early is", "late"),
    ("A baby cat is called a", "kitten"), ("A baby dog is called a", "puppy"),
    ("A baby cow is called a", "calf"), ("A baby sheep is called a", "lamb"),
    ("The color of the clear sky is", "blue"), ("The color of fresh grass is", "green"),
    ("The color of snow is", "white"), ("The color of coal is", "black"),
    ("Bees make", "honey"), ("Cows give us", "milk"), ("Hens lay", "eggs"),
    ("We see with our", "eyes"), ("We hear with our", "ears"), ("We smell with our", "nose"),
    ("Ice is frozen", "water"), ("Bread is baked in an", "oven"),
    ("The day after Monday is", "Tuesday"), ("The month after January is", "February"),
    ("A week has seven", "days"), ("A year has twelve", "months"),
    ("Fish swim in the", "water"), ("Birds fly in the", "sky"),
    ("You write on paper with a", "pen"), ("You cut paper with", "scissors"),
]


def arithmetic(rng: random.Random) -> tuple[str, int]:
  a, b = rng.randint(2, 40), rng.randint(2, 40)
  op = rng.choice(["plus", "minus", "times"]) if max(a, b) < 13 else rng.choice(["plus",
                                                                                  "minus"])
  value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
  return f"Question: What is {a} {op} {b}?\nAnswer:", value


def arithmetic_mc(rng: random.Random, n: int) -> list[dict]:
  out = []
  for _ in range(n):
    context, value = arithmetic(rng)
    choices = [value + d for d in rng.sample([-10, -2, -1, 1, 2, 10], 3)] + [value]
    rng.shuffle(choices)
    out.append({"context": context, "choices": [str(c) for c in choices],
                "label": choices.index(value)})
  return out


def arithmetic_gen(rng: random.Random, n: int) -> list[dict]:
  return [{"prompt": c, "answer": str(v)} for c, v in (arithmetic(rng) for _ in range(n))]


def word_mc(rng: random.Random, items) -> list[dict]:
  answers = sorted({a for _, a in WORDS})
  out = []
  for context, answer in items:
    choices = rng.sample([a for a in answers if a != answer], 3) + [answer]
    rng.shuffle(choices)
    out.append({"context": context, "choices": choices, "label": choices.index(answer)})
  return out


def paragraphs() -> list[dict]:
  text = CORPUS.read_text(encoding="utf-8").strip().split("\n\n")
  return [{"text": " ".join(p.split())} for p in text[-8:]]


def write_jsonl(name: str, records: list[dict]) -> None:
  lines = [json.dumps(r, ensure_ascii=False) for r in records]
  (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_spec(name: str, spec: dict) -> None:
  (HERE / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")


@exits.command("gemma_jax.eval.tasks.make_tasks")
def main(argv: list[str]) -> int:
  del argv  # no flags: the files are a function of the seed
  rng = random.Random(22)
  write_jsonl("arithmetic_mc.jsonl", arithmetic_mc(rng, 48))
  write_jsonl("arithmetic_mc_fewshot.jsonl", arithmetic_mc(rng, 16))
  write_spec("arithmetic_mc", {"kind": "multiple_choice", "data": "arithmetic_mc.jsonl",
                               "fewshot_data": "arithmetic_mc_fewshot.jsonl", "num_fewshot": 3})
  words = rng.sample(WORDS, len(WORDS))
  write_jsonl("word_completion.jsonl", word_mc(rng, words[:24]))
  write_jsonl("word_completion_fewshot.jsonl", word_mc(rng, words[24:]))
  write_spec("word_completion", {"kind": "multiple_choice", "data": "word_completion.jsonl",
                                 "fewshot_data": "word_completion_fewshot.jsonl",
                                 "num_fewshot": 2})
  write_jsonl("arithmetic_gen.jsonl", arithmetic_gen(rng, 32))
  write_jsonl("arithmetic_gen_fewshot.jsonl", arithmetic_gen(rng, 16))
  write_spec("arithmetic_gen", {"kind": "generation", "data": "arithmetic_gen.jsonl",
                                "fewshot_data": "arithmetic_gen_fewshot.jsonl",
                                "num_fewshot": 3, "stop": ["\n"], "max_new_tokens": 8,
                                "answer_regex": r"(-?\d+)"})
  write_jsonl("prose.jsonl", paragraphs())
  write_spec("prose_perplexity", {"kind": "perplexity", "data": "prose.jsonl"})
  return 0


if __name__ == "__main__":
  sys.exit(main())
