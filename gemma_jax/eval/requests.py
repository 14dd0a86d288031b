"""What is scored, as lm-evaluation-harness (0.4) builds it: prompts with few-shot examples,
(context, continuation) token pairs, and the windows of a long document.

- A prompt is `description + fewshot_delimiter` (if any), then per example `question +
  target_delimiter + answer + fewshot_delimiter`, then the question. Examples are drawn with
  one `random.Random(fewshot_seed)` per task, `rng.sample(fewshot_docs, n)` per document in
  order: the harness's sampler when the few-shot split is not the evaluated one.
- A multiple-choice continuation is `target_delimiter + choice`. Trailing whitespace of the
  context moves to the continuation; the pair is encoded whole (BOS first) and the
  continuation is the tokens after those of the context alone, so a boundary token is
  counted where the harness counts it. An empty context becomes BOS.
- A document is scored in windows of `length` tokens (BOS first), every token once: the
  harness's rolling windows when overlap is 0 (each window scores `length` new tokens, the
  last one filled with what precedes it); with overlap k windows advance by length - k, so
  every scored token after the first window sees at least k tokens before it (a sliding
  window).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from gemma_jax.eval.tasks import Task
from gemma_jax.tokenizer import Tokenizer

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def question(task: Task, doc: dict) -> str:
  return doc["context"] if task.kind == "multiple_choice" else doc["prompt"]


def answer(task: Task, doc: dict) -> str:
  return doc["choices"][doc["label"]] if task.kind == "multiple_choice" else doc["answer"]


def prompts(task: Task) -> list[str]:
  """Every document's prompt, with its few-shot examples (module docstring)."""
  rng = random.Random(task.fewshot_seed)
  head = task.description + task.fewshot_delimiter if task.description else ""
  out = []
  for doc in task.docs:
    shots = rng.sample(list(task.fewshot_docs), task.num_fewshot) if task.num_fewshot else []
    examples = "".join(question(task, s) + task.target_delimiter + answer(task, s) +
                       task.fewshot_delimiter for s in shots)
    out.append(head + examples + question(task, doc))
  return out


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Pair:
  """(context, continuation) tokens of the harness's loglikelihood request."""
  if not context:
    return [tokenizer.bos_id], tokenizer.encode(continuation)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenizer.encode(context + continuation, add_bos=True)
  head = tokenizer.encode(context, add_bos=True)
  return head, whole[len(head):]


def windows(tokens: list[int], prefix: int, length: int, overlap: int = 0) -> Iterator[Pair]:
  """(context, scored) token pairs covering `tokens` once (module docstring): each window
  runs `length` tokens (fewer only when the document is shorter), the first from `prefix`;
  later ones score up to length - overlap new tokens after what precedes them."""
  if not 0 <= overlap < length:
    raise ValueError(f"overlap {overlap} must be in [0, {length})")
  first = min(length, len(tokens))
  if tokens:
    yield [prefix], tokens[:first]
  done = first
  while done < len(tokens):
    n = min(length - overlap, len(tokens) - done)
    yield tokens[max(done - (length - n + 1), 0):done], tokens[done:done + n]
    done += n
