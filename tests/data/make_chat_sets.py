"""Writes the tiny chat SFT, preference and RL-prompt sets next to this file.

  python tests/data/make_chat_sets.py

Deterministic (fixed seed): the output is checked in, and tests/test_data_files.py checks that
rerunning this script reproduces it. Everything is written by hand here or computed (arithmetic,
unit conversions, spelling), so every answer is correct and the licence is the project's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "Answer briefly and exactly."

# Hand-written questions about the topics of tokenizer_corpus.txt, with a good and a poor answer.
FACTS = [
  ("What are the four basic ingredients of bread?",
   "Flour, water, salt and yeast.", "Mostly sugar and butter."),
  ("Why does kneading make dough springy?",
   "Kneading stretches the gluten strands and lines them up, so the dough holds its shape.",
   "Kneading adds air from your hands."),
  ("What causes the tides?",
   "Mainly the moon's pull on the oceans, helped a little by the sun.",
   "The wind pushing water towards the shore."),
  ("How many high tides does a coast usually get in a day?",
   "About two, roughly every twelve hours and twenty-five minutes.", "One, at noon."),
  ("What should I do about a squeaky bicycle chain?",
   "Clean it, then put a small drop of chain lubricant on each link and wipe off the excess.",
   "Pour a whole bucket of oil over it."),
  ("What do plants make from sunlight, water and carbon dioxide?",
   "Sugar, releasing oxygen as a by-product.", "Salt."),
  ("What is a volcano?",
   "A place where molten rock from inside the planet reaches the surface.",
   "A mountain that is very hot on top for no reason."),
  ("Are coffee beans really beans?",
   "No, they are the seeds of a cherry-like fruit.", "Yes, they grow in pods like peas."),
  ("What is a prime number?",
   "A whole number above 1 whose only divisors are 1 and itself.",
   "Any odd number."),
  ("Why does the moon always show us the same face?",
   "It turns once on its axis for every orbit of the Earth, so the same side faces us.",
   "It does not spin at all."),
  ("At what temperature does water boil at sea level?",
   "At 100 degrees Celsius.", "At 50 degrees Celsius."),
  ("Why is a sharp knife safer than a dull one?",
   "It needs less force, so it is less likely to slip.", "It is not; dull knives are safer."),
  ("How do snowflakes form?",
   "Water vapour freezes onto a speck of dust high in a cloud and grows into a crystal.",
   "Raindrops get squashed on the way down."),
  ("Why do honeybees dance?",
   "To tell other bees the direction and distance of food.", "Because they like music."),
  ("What is compost?",
   "Kitchen and garden scraps broken down by microbes into rich soil.",
   "Rubbish that should go to landfill."),
  ("Is a mushroom the whole fungus?",
   "No, it is only the fruit of a much larger network of threads underground.",
   "Yes, there is nothing else to it."),
]
UNITS = [("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
         ("metres", "centimetres", 100), ("kilograms", "grams", 1000), ("weeks", "days", 7)]
WORDS = ["bread", "tide", "chain", "garden", "coffee", "harbour", "pencil", "glass", "river",
         "market", "library", "bridge", "origami", "compost", "octopus", "lantern"]


def arithmetic(rng: random.Random) -> tuple[str, str, str, int]:
  a, b = rng.randint(2, 99), rng.randint(2, 99)
  op = rng.choice("+-*")
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}.", op, value


def conversion(rng: random.Random) -> tuple[str, str, int]:
  big, small, factor = rng.choice(UNITS)
  n = rng.randint(2, 12)
  return (f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}.",
          n * factor)


def spelling(rng: random.Random) -> tuple[str, str, str]:
  word = rng.choice(WORDS)
  if rng.random() < 0.5:
    return f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.", word[::-1]
  return (f"How many letters are in the word '{word}'?",
          f"'{word}' has {len(word)} letters.", str(len(word)))


def task(rng: random.Random) -> tuple[str, str, str]:
  """A (question, good answer, short reference answer) triple."""
  kind = rng.choice(["arithmetic", "conversion", "spelling"])
  if kind == "arithmetic":
    question, answer, _, value = arithmetic(rng)
    return question, answer, str(value)
  if kind == "conversion":
    question, answer, value = conversion(rng)
    return question, answer, str(value)
  return spelling(rng)


def wrong(answer: str, rng: random.Random) -> str:
  """A plausible but wrong or unhelpful answer."""
  digits = [c for c in answer if c.isdigit()]
  if digits and rng.random() < 0.7:
    i = max(k for k, c in enumerate(answer) if c.isdigit())
    return answer[:i] + str((int(answer[i]) + rng.randint(1, 8)) % 10) + answer[i + 1:]
  return rng.choice(["I am not sure.", "You should look that up yourself.",
                     "That question has no answer."])


def sft_records(rng: random.Random, count: int) -> list[dict]:
  records = []
  for question, good, _ in FACTS:
    records.append({"messages": [{"role": "user", "content": question},
                                 {"role": "model", "content": good}]})
  while len(records) < count:
    question, answer, _ = task(rng)
    messages = [{"role": "user", "content": question}, {"role": "model", "content": answer}]
    if rng.random() < 0.2:
      messages.insert(0, {"role": "system", "content": SYSTEM})
    if rng.random() < 0.3:
      follow_up, follow_answer, _ = task(rng)
      messages += [{"role": "user", "content": f"Thanks. And: {follow_up}"},
                   {"role": "model", "content": follow_answer}]
    records.append({"messages": messages})
  rng.shuffle(records)
  return records


def preference_records(rng: random.Random, count: int) -> list[dict]:
  records = [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in FACTS]
  while len(records) < count:
    question, answer, _ = task(rng)
    records.append({"prompt": question, "chosen": answer, "rejected": wrong(answer, rng)})
  rng.shuffle(records)
  return records


def rl_records(rng: random.Random, count: int) -> list[dict]:
  records = []
  for i in range(count):
    question, _, reference = task(rng)
    records.append({"id": i, "prompt": question, "answer": reference})
  return records


def write_jsonl(path: Path, records: list[dict]) -> None:
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(out_dir: Path = HERE) -> None:
  rng = random.Random(20240604)
  write_jsonl(out_dir / "chat_sft.jsonl", sft_records(rng, 240))
  write_jsonl(out_dir / "preferences.jsonl", preference_records(rng, 160))
  write_jsonl(out_dir / "rl_prompts.jsonl", rl_records(rng, 120))


if __name__ == "__main__":
  main()
