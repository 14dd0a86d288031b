"""Programmatic rewards for RLHF (config.rlhf.reward_fn = "gemma_jax.rewards:NAME").

A reward function takes the decoded prompts and completions (lists of str, one per
completion) and, as keyword arguments, every other field of the prompt records (lists of the
same length: a prompt's fields repeat for each of its k completions), and returns one float
per completion. Fields a function does not use are absorbed by **_.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_INTEGER = re.compile(r"-?\d+")


def digit_fraction(text: str) -> float:
  """The fraction of the non-space characters of `text` that are ASCII digits (0 if none)."""
  chars = [c for c in text if not c.isspace()]
  return sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0


def first_integer(text: str) -> str | None:
  match = _INTEGER.search(text)
  return match.group() if match else None


def digits(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
  """digit_fraction of each completion: in [0, 1]."""
  del prompts
  return [digit_fraction(c) for c in completions]


def digits_answer(prompts: Sequence[str], completions: Sequence[str], *,
                  answer: Sequence[str], **_) -> list[float]:
  """digit_fraction + 1 when the first integer of the completion is the record's `answer`:
  in [0, 2]. The first term is what a tiny model can find by sampling; the second is the
  task proper (configs/rlhf_tiny.py)."""
  del prompts
  return [digit_fraction(c) + float(first_integer(c) == str(a).strip())
          for c, a in zip(completions, answer, strict=True)]
