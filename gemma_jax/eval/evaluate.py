"""Run a task on a model: the metrics of each kind, defined as lm-evaluation-harness defines
them.

  perplexity       token_perplexity exp(-sum log p / tokens) (token-weighted over the set),
                   bits_per_byte -sum log p / (bytes * ln 2), byte_perplexity, word_perplexity
                   (words: re.split(r"\\s+", text)), each document in windows of max_length
                   (or the task's context_length) tokens
  multiple_choice  acc: argmax of the choices' log-likelihoods is the label; acc_norm: the
                   same of log-likelihood / len(choice) in characters
  generation       exact_match: greedy continuation, cut at the first stop string, the
                   answer_regex's first match (its first group, if any) stripped == answer
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gemma_jax.eval import requests
from gemma_jax.eval.progress import Progress
from gemma_jax.eval.scorer import Scorer
from gemma_jax.eval.tasks import Task
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer

INVALID = "[invalid]"  # the answer of a completion the regex does not match (as the harness)


class Evaluator:
  """Tasks on one model; `run(task)` returns its metrics (floats) and example count."""

  def __init__(self, model: nnx.Module, tokenizer: Tokenizer, mesh: Mesh | None = None, *,
               max_length: int | None = None, batch_size: int = 8, progress: bool = True):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
    self.batch_size, self.show_progress = batch_size, progress
    self.scorer = Scorer(model, mesh, max_length=self.max_length, batch_rows=batch_size)

  def run(self, task: Task, limit: int = 0) -> dict[str, float]:
    if limit:
      task = _limited(task, limit)
    run = {"perplexity": self.perplexity, "multiple_choice": self.multiple_choice,
           "generation": self.generation}[task.kind]
    return {**run(task), "examples": float(len(task.docs))}

  def _score(self, task: Task, pairs: list[requests.Pair]) -> list[tuple[float, bool]]:
    bar = Progress(len(pairs), task.name, self.show_progress)
    try:
      return self.scorer.score(pairs, bar.update)
    finally:
      bar.close()

  def perplexity(self, task: Task) -> dict[str, float]:
    length = min(task.context_length or self.max_length, self.max_length)
    texts = [d["text"] for d in task.docs]
    docs = [list(requests.windows(self.tokenizer.encode(t), self.tokenizer.bos_id, length,
                                  task.context_overlap)) for t in texts]
    scores = self._score(task, [w for d in docs for w in d])
    logp = sum(s for s, _ in scores)
    tokens = sum(len(scored) for d in docs for _, scored in d)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    return {"token_perplexity": _exp(-logp / tokens), "bits_per_byte": -logp / nbytes /
            math.log(2), "byte_perplexity": _exp(-logp / nbytes),
            "word_perplexity": _exp(-logp / words), "tokens": float(tokens)}

  def choice_loglikelihoods(self, task: Task) -> list[list[float]]:
    """Every document's per-choice log-likelihoods (what acc and acc_norm rank)."""
    pairs = [requests.encode_pair(self.tokenizer, prompt, task.target_delimiter + c)
             for prompt, doc in zip(requests.prompts(task), task.docs) for c in doc["choices"]]
    scores = iter(self._score(task, pairs))
    return [[next(scores)[0] for _ in doc["choices"]] for doc in task.docs]

  def multiple_choice(self, task: Task) -> dict[str, float]:
    lls = self.choice_loglikelihoods(task)
    acc = [np.argmax(ll) == d["label"] for ll, d in zip(lls, task.docs)]
    norm = [np.argmax(np.array(ll) / [len(c) for c in d["choices"]]) == d["label"]
            for ll, d in zip(lls, task.docs)]
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(norm))}

  def completions(self, task: Task) -> list[str]:
    """Greedy completions of every prompt, cut at the task's stop strings."""
    sampler = Sampler(self.model, self.tokenizer, mesh=self.mesh)
    params = SamplingParams(max_new_tokens=task.max_new_tokens, stop=tuple(task.stop))
    keep = self.max_length - task.max_new_tokens
    if keep < 1:
      raise ValueError(f"{task.name}: max_new_tokens={task.max_new_tokens} leaves no room "
                       f"for a prompt in max_length {self.max_length}")
    ids = [self.tokenizer.encode(p, add_bos=True)[-keep:] for p in requests.prompts(task)]
    bar, out = Progress(len(ids), task.name, self.show_progress), []
    for start in range(0, len(ids), self.batch_size):
      out += [c.text for c in sampler.generate(ids[start:start + self.batch_size], params)]
      bar.update(len(ids[start:start + self.batch_size]))
    bar.close()
    return out

  def generation(self, task: Task) -> dict[str, float]:
    answers = [extract(task.answer_regex, c) for c in self.completions(task)]
    hits = [a == d["answer"].strip() for a, d in zip(answers, task.docs)]
    return {"exact_match": float(np.mean(hits))}


def extract(pattern: str, text: str) -> str:
  """The answer in a completion: the first match of `pattern` (its first non-empty group
  when it has groups), stripped; the whole stripped text without a pattern."""
  if not pattern:
    return text.strip()
  found = re.findall(pattern, text)
  if not found:
    return INVALID
  first = found[0]
  if isinstance(first, tuple):
    first = next((g for g in first if g), INVALID)
  return first.strip()


def _exp(x: float) -> float:
  return math.exp(min(x, 700.0))


def _limited(task: Task, limit: int) -> Task:
  return dataclasses.replace(task, docs=task.docs[:limit])


def run_tasks(evaluator: Evaluator, tasks: Sequence[Task], limit: int = 0
              ) -> dict[str, dict[str, float]]:
  return {task.name: evaluator.run(task, limit) for task in tasks}
