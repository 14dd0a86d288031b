"""The `config.data` schema: defaults in one place, validated into frozen settings."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from gemma_jax.data.token_shards import MANIFEST

FORMATS = ("pretrain", "chat", "preference", "rl")
PACKINGS = ("concat", "first_fit", "none")
KINDS = ("jsonl", "text", "array_record", "parquet", "tokens", "memory")
RL_PADDINGS = ("left", "right")
# Canonical record fields; a source's `fields` maps them to the names its records use.
FIELDS = ("text", "tokens", "messages", "prompt", "chosen", "rejected")
_SOURCE_KEYS = ("path", "kind", "weight", "fields", "records", "name")
_SUFFIX_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text",
                 ".array_record": "array_record", ".arrayrecord": "array_record",
                 ".parquet": "parquet"}


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` subtree with every key and its default (locked: typos fail)."""
  c = ml_collections.ConfigDict()
  # Each source: {path (file, glob or list), kind ("auto": from the suffix, or one of KINDS),
  # weight (mixing weight, default 1), fields ({canonical field: name in the records}),
  # name (in the per-source metrics; default: the first file's stem, or memoryK)};
  # in-memory sources give `records` (a list of dicts or strings) instead of `path`.
  # jsonl: one JSON object per line; text: one document per blank-line separated paragraph;
  # array_record: UTF-8 JSON records (python -m gemma_jax.data.to_array_record);
  # parquet: one record per row, read by row groups (columns as fields; see data/parquet.py);
  # tokens: directories written by python -m gemma_jax.data.pretokenize (no tokenizing).
  c.sources = []
  c.format = "pretrain"        # pretrain | chat | preference | rl
  c.seq_len = 1024             # row length (rl: the prompt buffer length)
  c.batch_size = 8             # global rows per batch, over all processes
  c.packing = "concat"         # concat (cut across rows) | first_fit | none (one per row)
  c.packing_bins = 64          # first_fit: rows filled at once (more bins, less padding)
  c.truncate_long = False      # over seq_len: truncate, else split (a pair: a bad record)
  # text sources: a paragraph longer than this many bytes is read, tokenized and packed as
  # pieces of at most this size cut at whitespace (each its own segment), so memory and the
  # time to a batch do not grow with a document's size.
  c.piece_bytes = 1 << 16
  c.shuffle = True             # reshuffled every epoch
  c.seed = 0
  # None repeats forever; with several sources, each repeats this often and the mix ends
  # when the first runs out. Finite runs drop the last, incomplete batch.
  c.num_epochs = config_dict.placeholder(int)
  c.worker_count = 0           # grain worker processes for parsing + tokenizing
  c.skip_bad_records = False   # False: a bad record raises, naming its file and line
  c.chat_template = True       # preference / rl prompts as a Gemma user turn
  c.rl_padding = "left"        # rl prompt rows: left- or right-padded
  c.lock()
  return c


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One validated source; `fields` maps every canonical field to its name in the records."""
  kind: str
  paths: tuple[str, ...]  # Empty for in-memory sources.
  records: tuple[Any, ...]
  weight: float
  fields: Mapping[str, str]
  label: str  # The source's name in metrics.

  @property
  def name(self) -> str:
    return ",".join(self.paths) if self.paths else "<memory>"


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.data` validated, with its sources resolved to files."""
  sources: tuple[SourceSpec, ...]
  format: str
  seq_len: int
  batch_size: int
  packing: str
  packing_bins: int
  truncate_long: bool
  piece_bytes: int
  shuffle: bool
  seed: int
  num_epochs: int | None
  worker_count: int
  skip_bad_records: bool
  chat_template: bool
  rl_padding: str


def parse_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Settings:
  """Validates `config.data`; every error names the offending key."""
  values = dict(_plain(config))
  unknown = sorted(set(values) - set(default_config()))
  if unknown:
    raise ValueError(f"unknown config.data keys {unknown}")
  values = {**default_config().to_dict(), **values}
  _check_choice("format", values["format"], FORMATS)
  _check_choice("packing", values["packing"], PACKINGS)
  _check_choice("rl_padding", values["rl_padding"], RL_PADDINGS)
  for key, low in (("seq_len", 2), ("batch_size", 1), ("packing_bins", 1), ("worker_count", 0),
                   ("seed", 0), ("piece_bytes", 64)):
    if not isinstance(values[key], int) or values[key] < low:
      raise ValueError(f"config.data.{key} must be an int >= {low}, got {values[key]!r}")
  if values["num_epochs"] is not None and values["num_epochs"] < 1:
    raise ValueError(f"config.data.num_epochs must be None or >= 1, got {values['num_epochs']}")
  if values["format"] == "preference" and values["packing"] == "concat":
    raise ValueError("config.data.packing='concat' would split preference pairs across rows; "
                     "use 'first_fit' or 'none'")
  sources = tuple(_source_spec(i, s) for i, s in enumerate(values["sources"]))
  if not sources:
    raise ValueError("config.data.sources is empty: the dataset has no source")
  labels = [s.label for s in sources]
  if len(set(labels)) < len(labels):
    raise ValueError(f"config.data.sources have the same name twice in {labels}; give them "
                     "distinct 'name's (the per-source metrics are keyed by name)")
  values["sources"] = sources
  return Settings(**values)


def _plain(value: Any) -> Any:
  # ConfigDict is not a Mapping, and to_dict() leaves ConfigDicts inside lists alone.
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"config.data.{key} must be one of {list(choices)}, got {value!r}")


def _source_spec(i: int, entry: Mapping[str, Any]) -> SourceSpec:
  where = f"config.data.sources[{i}]"
  entry = _plain(entry)
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
  entry = dict(entry)
  unknown = sorted(set(entry) - set(_SOURCE_KEYS))
  if unknown:
    raise ValueError(f"{where} has unknown keys {unknown}; expected some of {list(_SOURCE_KEYS)}")
  if ("path" in entry) == ("records" in entry):
    raise ValueError(f"{where} needs exactly one of 'path' or 'records'")
  weight = entry.get("weight", 1.0)
  if not isinstance(weight, (int, float)) or weight <= 0:
    raise ValueError(f"{where}.weight must be a positive number, got {weight!r}")
  fields = dict(_plain(entry.get("fields")) or {})
  bad_fields = sorted(set(fields) - set(FIELDS))
  if bad_fields:
    raise ValueError(f"{where}.fields has unknown keys {bad_fields}; "
                     f"expected some of {list(FIELDS)}")
  fields = {f: fields.get(f, f) for f in FIELDS}
  if "records" in entry:
    return SourceSpec("memory", (), tuple(entry["records"]), float(weight), fields,
                      _label(where, entry, f"memory{i}"))
  paths = _expand(where, entry["path"])
  kind = entry.get("kind", "auto")
  if kind == "auto":
    kind = infer_kind(where, paths)
  _check_choice(f"sources[{i}].kind", kind, KINDS[:-1])
  default = os.path.splitext(os.path.basename(paths[0]))[0] + ("*" if len(paths) > 1 else "")
  return SourceSpec(kind, paths, (), float(weight), fields, _label(where, entry, default))


def _label(where: str, entry: Mapping[str, Any], default: str) -> str:
  name = entry.get("name", default)
  if not isinstance(name, str) or not name or "/" in name:
    raise ValueError(f"{where}.name must be a non-empty string without '/', got {name!r}")
  return name


def _expand(where: str, path: str | Sequence[str]) -> tuple[str, ...]:
  patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  paths = []
  for pattern in map(os.fspath, patterns):
    matches = sorted(glob.glob(pattern))
    if not matches:
      raise FileNotFoundError(f"{where}.path: no file matches {pattern!r}")
    paths.extend(matches)
  return tuple(paths)


def infer_kind(where: str, paths: Sequence[str]) -> str:
  """The one source kind that the suffixes of `paths` imply."""
  kinds = {"tokens" if os.path.isfile(os.path.join(p, MANIFEST)) else
           _SUFFIX_KINDS.get(os.path.splitext(p)[1].lower()) for p in paths}
  if len(kinds) != 1 or None in kinds:
    raise ValueError(f"{where}: cannot infer the kind of {list(paths)} from the suffixes "
                     f"{sorted(_SUFFIX_KINDS)} (or a directory's {MANIFEST}); set 'kind' to "
                     f"one of {list(KINDS[:-1])}")
  return kinds.pop()
