"""Reward functions that misbehave on one emulated host only (tests/test_multihost.py): the
error must stop every host, not leave the others waiting in a collective."""

import jax

from gemma_jax.rewards import digits_answer


def wrong_count_on_process_1(prompts, completions, **fields):
  scores = digits_answer(prompts, completions, **fields)
  return scores[:-1] if jax.process_index() == 1 else scores


def nan_on_process_1(prompts, completions, **fields):
  scores = digits_answer(prompts, completions, **fields)
  return [float("nan")] + scores[1:] if jax.process_index() == 1 else scores
