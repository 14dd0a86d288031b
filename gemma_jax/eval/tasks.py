"""Evaluation tasks: a JSON spec naming a local JSONL file, and that file's checked records.

A task is a `.json` spec (or a shipped task's name, a spec in gemma_jax/eval/tasks/), or a
bare `.jsonl` file whose kind is read from its first record's fields:

  perplexity       {"text": str}
  multiple_choice  {"context": str, "choices": [str, ...], "label": int}
  generation       {"prompt": str, "answer": str}

Spec keys (relative paths are relative to the spec): kind, data, and optionally
fewshot_data, num_fewshot, fewshot_seed, description, target_delimiter, fewshot_delimiter
(lm-evaluation-harness's defaults: " " and "\\n\\n"), stop, max_new_tokens, answer_regex
(generation), context_length and context_overlap (perplexity). A bad record is a ValueError
naming the file, line and field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "tasks"
KINDS = ("perplexity", "multiple_choice", "generation")
FIELDS = {"perplexity": ("text",), "multiple_choice": ("context", "choices", "label"),
          "generation": ("prompt", "answer")}


@dataclasses.dataclass(frozen=True)
class Task:
  """One task and its records (dicts with the kind's FIELDS)."""

  name: str
  kind: str
  docs: tuple[dict, ...]
  fewshot_docs: tuple[dict, ...] = ()
  num_fewshot: int = 0
  fewshot_seed: int = 1234  # lm-evaluation-harness's default
  description: str = ""
  target_delimiter: str = " "
  fewshot_delimiter: str = "\n\n"
  stop: tuple[str, ...] = ("\n\n",)
  max_new_tokens: int = 32
  answer_regex: str = ""  # empty: the whole stripped completion is the answer
  context_length: int = 0  # tokens per perplexity window; 0 = the evaluator's max_length
  context_overlap: int = 0  # tokens of a window that only condition (a sliding window)


_SPEC_KEYS = {f.name for f in dataclasses.fields(Task)} - {"name", "docs", "fewshot_docs"}
_SPEC_KEYS |= {"data", "fewshot_data"}


def shipped() -> list[str]:
  """Names of the tasks shipped with the package."""
  return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def load_task(name_or_path: str | Path) -> Task:
  """The task named by a shipped name, a .json spec or a .jsonl file (module docstring)."""
  path = Path(name_or_path)
  if not path.exists() and (SHIPPED_DIR / f"{name_or_path}.json").is_file():
    path = SHIPPED_DIR / f"{name_or_path}.json"
  if not path.is_file():
    raise FileNotFoundError(f"task {str(name_or_path)!r}: no such file or shipped task "
                            f"(shipped: {', '.join(shipped())})")
  if path.suffix == ".jsonl":
    kind = infer_kind(path, read_records(path)[0])
    return Task(path.stem, kind, tuple(read_records(path, kind)))
  return _from_spec(path)


def _from_spec(path: Path) -> Task:
  try:
    spec = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}, line {e.lineno}: not JSON ({e.msg})") from None
  if not isinstance(spec, dict) or "data" not in spec or "kind" not in spec:
    raise ValueError(f"{path}: a task spec is a JSON object with 'kind' and 'data'")
  if unknown := sorted(set(spec) - _SPEC_KEYS):
    raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(_SPEC_KEYS)}")
  if spec["kind"] not in KINDS:
    raise ValueError(f"{path}: kind {spec['kind']!r}; choose one of {KINDS}")
  kind = spec.pop("kind")
  docs = read_records(path.parent / spec.pop("data"), kind)
  fewshot = spec.pop("fewshot_data", None)
  fewshot_docs = read_records(path.parent / fewshot, kind) if fewshot else []
  spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
  task = Task(path.stem, kind, tuple(docs), tuple(fewshot_docs), **spec)
  _check_settings(path, task)
  return task


def _check_settings(path: Path, task: Task) -> None:
  if task.num_fewshot < 0 or task.num_fewshot > len(task.fewshot_docs):
    raise ValueError(f"{path}: num_fewshot={task.num_fewshot} needs that many fewshot_data "
                     f"records (there are {len(task.fewshot_docs)})")
  if task.max_new_tokens < 1 or task.context_length < 0 or task.context_overlap < 0:
    raise ValueError(f"{path}: max_new_tokens must be >= 1, context_length and "
                     "context_overlap >= 0")
  if task.context_length and task.context_overlap >= task.context_length:
    raise ValueError(f"{path}: context_overlap={task.context_overlap} must be below "
                     f"context_length={task.context_length}")
  try:
    re.compile(task.answer_regex)
  except re.error as e:
    raise ValueError(f"{path}: answer_regex {task.answer_regex!r}: {e}") from None


def infer_kind(path: Path, first: dict) -> str:
  """The kind whose first field the file's first record has."""
  for kind, fields in FIELDS.items():
    if fields[0] in first:
      return kind
  firsts = ", ".join(sorted(f[0] for f in FIELDS.values()))
  raise ValueError(f"{path}, line 1: no field that names a task kind ({firsts})")


def read_records(path: Path, kind: str | None = None) -> list[dict]:
  """The JSON objects of a JSONL file (blank lines skipped), each checked against `kind`."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such task data file")
  records = []
  for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not text.strip():
      continue
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {line}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}, line {line}: a record must be a JSON object")
    if kind is not None:
      check_record(path, line, record, kind)
    records.append(record)
  if not records:
    raise ValueError(f"{path}: no records")
  return records


def check_record(path: Path, line: int, record: dict, kind: str) -> None:
  """Raise ValueError naming file, line and field when `record` is not a `kind` record."""
  where = f"{path}, line {line}"
  for field in FIELDS[kind]:
    if field not in record:
      raise ValueError(f"{where}: missing field {field!r} (a {kind} record has "
                       f"{', '.join(FIELDS[kind])})")
  if kind == "multiple_choice":
    _check_choices(where, record)
  else:
    for field in FIELDS[kind]:
      if not isinstance(record[field], str) or (field == "text" and not record[field]):
        raise ValueError(f"{where}: field {field!r} must be a non-empty string"
                         if field == "text" else f"{where}: field {field!r} must be a string")


def _check_choices(where: str, record: dict) -> None:
  choices, label = record["choices"], record["label"]
  if not isinstance(record["context"], str):
    raise ValueError(f"{where}: field 'context' must be a string")
  if not isinstance(choices, list) or not choices:
    raise ValueError(f"{where}: field 'choices' must be a non-empty list of strings")
  if not all(isinstance(c, str) and c for c in choices):
    raise ValueError(f"{where}: field 'choices' must hold non-empty strings")
  if not isinstance(label, int) or isinstance(label, bool):
    raise ValueError(f"{where}: field 'label' must be an integer index into 'choices'")
  if not 0 <= label < len(choices):
    raise ValueError(f"{where}: field 'label' is {label}, out of range for "
                     f"{len(choices)} choices")
