"""The grain pipeline: records -> shuffle, repeat, mix -> this process's share -> tokenize and
format (in grain workers if configured) -> bad-record check -> pack -> batch -> global arrays.

Everything up to the format step is a `MapDataset`, so the order of the records is fixed by
the seed and indices alone: worker processes change the speed, never the batches.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from grain.experimental import (ConcatThenSplitIterDataset, DatasetOptions,
                                FirstFitPackIterDataset, WithOptionsIterDataset)
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax.data.config import Settings, SourceSpec, parse_config
from gemma_jax.data.formats import Formatter, Segment
from gemma_jax.data.sources import Bad, open_source, parse
from gemma_jax.sharding import LOGICAL_RULES, batch_axes
from gemma_jax.tokenizer import Tokenizer

# The first batch waits on shuffling indices, opening files and formatting a group of records:
# past this many seconds (and as often again) a line says that it is still coming.
_FIRST_BATCH_PATIENCE_S = 10.0
_LOGGED_SKIPS = 10  # Skipped records logged one by one per iterator; the rest only counted.
_PAIR = ("chosen_", "rejected_")
# Records are formatted in groups, so a worker process sends one message per group, not per
# record. Groups are cut before the per-worker slicing, so the record order stays the same.
_GROUP = 64
# Local files read fast; reader threads would only contend for the GIL (grain's advice).
_READ_OPTIONS = grain.ReadOptions(num_threads=0)
# Workers pickle smaller arrays: a shared-memory block per token array costs more than a copy.
_MIN_SHM_BYTES = 1 << 20

log = logging.getLogger(__name__)


class BadRecordError(ValueError):
  """A record that cannot be used, with data.skip_bad_records off."""


def make_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This process's batches as dicts of numpy arrays, batch_size // process_count rows each."""
  return _local_dataset(parse_config(config), tokenizer, process_index, process_count)[0]


def make_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh: Mesh, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> DataIterator:
  """Global batches as jax.Arrays whose batch dimension is sharded over (data, fsdp)."""
  settings = parse_config(config)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  sharding = _batch_sharding(mesh, settings, process_count)
  dataset, counts = _local_dataset(settings, tokenizer, process_index, process_count)
  return DataIterator(iter(dataset), sharding, settings.batch_size, counts, process_index,
                      process_count)


class DataIterator(grain.DatasetIterator):
  """Global batches; get_state()/set_state() hold this process's exact position (JSON-able).

  Being a grain `DatasetIterator`, it also works with `grain.checkpoint.CheckpointHandler`
  and orbax's checkpointables. `skipped_records` counts records skipped as bad so far.
  """

  def __init__(self, local: grain.DatasetIterator, sharding: NamedSharding, batch_size: int,
               counts: _Counts, process_index: int = 0, process_count: int = 1):
    super().__init__(local)
    self._sharding = sharding
    self._batch_size = batch_size
    self._counts = counts
    self._process = (process_index, process_count)
    self._first = True  # Only the first batch is reported when slow.

  def __next__(self) -> dict[str, Any]:
    if not self._first:
      local = next(self._parent)
    else:
      with _Waiting(self._counts):
        local = next(self._parent)
      self._first = False
    return {key: self._global(value) for key, value in local.items()}

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  @property
  def skipped_records(self) -> int:
    return self._counts.skipped

  def source_metrics(self) -> dict[str, float]:
    """Per source (by its `name`): `data_tokens/NAME`, the tokens this process has read from
    it, and `data_epochs/NAME`, the epochs of it the mixture has read (over all processes)."""
    return self._counts.metrics()

  def record_positions(self) -> list[int]:
    """Where this process's rows of an rl batch (one record per row) stand in the batch's
    record order: the processes are dealt the records in turn (_records), so local row i is
    record i * process_count + process_index. What one process would see at that position,
    whatever the number of processes."""
    index, count = self._process
    return [i * count + index for i in range(self._batch_size // count)]

  def _global(self, value: Any) -> Any:
    if not isinstance(value, np.ndarray):
      return value  # RL reference fields stay host-local Python objects.
    shape = (self._batch_size, *value.shape[1:])
    return jax.make_array_from_process_local_data(self._sharding, value, shape)


class _Waiting:
  """While the block runs, a log line every _FIRST_BATCH_PATIENCE_S seconds saying how long
  it has waited and what has been read so far (a slow first batch never stalls silently)."""

  def __init__(self, counts: _Counts):
    self._counts = counts
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._report, daemon=True)

  def __enter__(self) -> None:
    self._start = time.perf_counter()
    self._thread.start()

  def __exit__(self, *exc) -> None:
    self._done.set()
    self._thread.join()

  def _report(self) -> None:
    while not self._done.wait(_FIRST_BATCH_PATIENCE_S):
      tokens = sum(self._counts.tokens)
      log.warning("data: waiting %.0f s for the first batch; %d tokens packed so far (the "
                  "first group of %d records is being read and tokenized)",
                  time.perf_counter() - self._start, tokens, _GROUP)


def _batch_sharding(mesh: Mesh, settings: Settings, process_count: int) -> NamedSharding:
  """The batch sharding, refusing batch sizes the mesh or the processes cannot split."""
  axes = batch_axes(mesh)
  if not axes:
    raise ValueError(f"the mesh has no batch axis {LOGICAL_RULES['batch']}; its axes are "
                     f"{mesh.axis_names}")
  parallel = math.prod(mesh.shape[a] for a in axes)
  if settings.batch_size % parallel:
    sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"config.data.batch_size={settings.batch_size} is not divisible by the "
                     f"data-parallel size {parallel} ({sizes})")
  sharding = NamedSharding(mesh, PartitionSpec(axes))
  rows = {idx[0].indices(settings.batch_size)
          for idx in sharding.addressable_devices_indices_map((settings.batch_size,)).values()}
  local_rows = sum(len(range(*r)) for r in rows)
  if local_rows * process_count != settings.batch_size:
    raise ValueError(f"this process holds {local_rows} of {settings.batch_size} batch rows on "
                     f"the mesh, but {process_count} processes read batch_size / "
                     f"{process_count} rows each; lay out the mesh so that every process holds "
                     "an equal, distinct part of the batch")
  return sharding


def _local_dataset(settings: Settings, tokenizer: Tokenizer, process_index: int,
                   process_count: int) -> tuple[grain.IterDataset, _Counts]:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if settings.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={settings.batch_size} is not divisible by the "
                     f"process count {process_count}")
  records, epoch, sizes = _records(settings, tokenizer, process_index, process_count)
  groups = records.batch(_GROUP, batch_fn=list)
  ds = groups.map(functools.partial(_format_group, Formatter(tokenizer, settings)))
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  if settings.worker_count:
    # grain's worker start-up reads absl flags, which programs not run by absl.app never parse.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = WithOptionsIterDataset(ds, DatasetOptions(min_shm_size=_MIN_SHM_BYTES))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.worker_count))
  counts = _Counts(settings.sources, sizes)
  ds = _CheckedIterDataset(ds, settings.skip_bad_records, epoch, counts)
  rows = settings.batch_size // process_count
  if settings.format == "rl":
    return ds.batch(rows, drop_remainder=True, batch_fn=_stack_prompts), counts
  prefixes = _PAIR if settings.format == "preference" else ("",)
  ds = _pack(ds, settings, rows, prefixes).batch(rows, drop_remainder=True)
  return ds.map(functools.partial(_finalize, prefixes=prefixes)), counts


def _records(settings: Settings, tokenizer: Tokenizer, process_index: int,
             process_count: int) -> tuple[grain.MapDataset, int, list[int]]:
  """This process's share of the mixed record stream as (source, position in the source's
  repeated stream, record) triples, its records per epoch, and each source's size."""
  datasets, sizes = [], []
  for i, spec in enumerate(settings.sources):
    source = open_source(spec, i, all_columns=settings.format == "rl",
                         piece_bytes=settings.piece_bytes, tokenizer=tokenizer)
    sizes.append(len(source))
    ds = grain.MapDataset.source(source)
    if settings.shuffle:
      ds = ds.shuffle(seed=settings.seed + i)  # Reshuffled every epoch by repeat().
    ds = ds.repeat(settings.num_epochs)
    datasets.append(ds.map_with_index(functools.partial(_parse_tagged, source=i, spec=spec)))
  # grain's weighted mix is a fixed function of the index, so the mixture position is just
  # the record index every iterator state already holds.
  ds = (datasets[0] if len(datasets) == 1 else
        grain.MapDataset.mix(datasets, [s.weight for s in settings.sources]))
  total = sum(sizes)
  # Every process takes the same number of records, so none runs out first.
  share = len(ds) // process_count
  if not share:
    raise ValueError(f"the dataset has {len(ds)} records, fewer than the {process_count} "
                     "processes that share it")
  return (ds[process_index:share * process_count:process_count],
          max(1, total // process_count), sizes)


def _parse_tagged(position: int, item: tuple[str, Any], source: int,
                  spec: SourceSpec) -> _Tagged:
  return source, position, parse(item, kind=spec.kind, fields=spec.fields)


# (source index, position in that source's repeated stream, record / segment / Bad).
_Tagged = tuple[int, int, Any]


def _format_group(formatter: Formatter, group: list[_Tagged]) -> list[_Tagged]:
  """The segments of a group of records, in order, with a Bad in place of each bad record;
  each keeps its record's source and position for the per-source counts."""
  out = []
  for source, position, record in group:
    item = formatter(record)
    out.extend((source, position, s) for s in ([item] if isinstance(item, Bad) else item))
  return out


def _pack(ds: grain.IterDataset, settings: Settings, rows: int,
          prefixes: Sequence[str]) -> grain.IterDataset:
  lengths = {f"{p}{k}": settings.seq_len for p in prefixes for k in ("tokens", "weights")}
  if settings.packing == "concat":
    return ConcatThenSplitIterDataset(ds, length_struct=lengths)
  one_per_row = settings.packing == "none"
  return FirstFitPackIterDataset(
    ds, length_struct=lengths, num_packing_bins=rows if one_per_row else settings.packing_bins,
    shuffle_bins=False, max_sequences_per_bin=1 if one_per_row else None)


def _finalize(batch: dict[str, np.ndarray], prefixes: Sequence[str]) -> dict[str, np.ndarray]:
  """Packed rows -> tokens, positions, segment_ids, targets and loss_weights per prefix.

  targets[t] is tokens[t + 1] when both are in the same document, else 0; loss_weights[t] is
  that target's weight (0 where there is no target: padding, each document's last token).
  """
  out = {}
  for p in prefixes:
    tokens, segment_ids = batch[f"{p}tokens"], batch[f"{p}tokens_segment_ids"]
    has_target = np.zeros(tokens.shape, bool)
    has_target[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    out[f"{p}tokens"] = tokens
    out[f"{p}positions"] = batch[f"{p}tokens_positions"]
    out[f"{p}segment_ids"] = segment_ids
    out[f"{p}targets"] = np.where(has_target, _shift_left(tokens), 0).astype(np.int32)
    out[f"{p}loss_weights"] = np.where(
      has_target, _shift_left(batch[f"{p}weights"]), 0).astype(np.float32)
  return out


def _shift_left(x: np.ndarray) -> np.ndarray:
  out = np.zeros_like(x)
  out[:, :-1] = x[:, 1:]
  return out


def _stack_prompts(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
  batch = {k: np.stack([x[k] for x in items])
           for k in ("tokens", "positions", "segment_ids", "lengths")}
  batch["reference"] = [x["reference"] for x in items]
  return batch


class _Counts:
  """What one iterator has taken so far (restored with its state): records skipped as bad,
  and per source the tokens it handed to the packer and how far into the source's repeated
  stream the mixture has read (which, over the source's size, is the epochs read)."""

  def __init__(self, sources: Sequence[SourceSpec], sizes: Sequence[int]):
    self.names = [s.label for s in sources]
    self.sizes = list(sizes)
    self.skipped = 0
    self.tokens = [0] * len(sources)
    self.read = [0] * len(sources)

  def take(self, source: int, position: int, entry: Any) -> None:
    self.read[source] = max(self.read[source], position + 1)
    if not isinstance(entry, Bad):
      self.tokens[source] += _token_count(entry)

  def metrics(self) -> dict[str, float]:
    out = {}
    for name, size, tokens, read in zip(self.names, self.sizes, self.tokens, self.read):
      out[f"data_tokens/{name}"] = float(tokens)
      out[f"data_epochs/{name}"] = read / size
    return out

  def state(self) -> dict[str, Any]:
    return {"skipped": self.skipped, "tokens": list(self.tokens), "read": list(self.read)}

  def restore(self, state: dict[str, Any]) -> None:
    n = len(self.names)  # States saved before per-source counts start them from zero.
    self.skipped = state["skipped"]
    self.tokens = list(state.get("tokens", [0] * n))
    self.read = list(state.get("read", [0] * n))


def _token_count(segment: Segment) -> int:
  """Real tokens in a segment: an rl prompt row's length, else all its token arrays."""
  if "lengths" in segment:
    return int(segment["lengths"])
  return sum(v.size for k, v in segment.items() if k.endswith("tokens"))


class _CheckedIterDataset(grain.IterDataset):
  """Flattens groups of segments, raising on (or skipping and counting) bad records."""

  def __init__(self, parent: grain.IterDataset, skip_bad: bool, patience: int,
               counts: _Counts):
    super().__init__(parent)
    self._skip_bad = skip_bad
    self._patience = patience
    self._counts = counts

  def __iter__(self) -> grain.DatasetIterator:
    return _CheckedIterator(self._parent.__iter__(), self._skip_bad, self._patience,
                            self._counts)


class _CheckedIterator(grain.DatasetIterator):
  """State: the parent's state before the current group, and the entries taken from it."""

  def __init__(self, parent: grain.DatasetIterator, skip_bad: bool, patience: int,
               counts: _Counts):
    super().__init__(parent)
    self._skip_bad = skip_bad
    self._patience = patience  # Consecutive bad records that mean none is good.
    self._counts = counts
    self._parent_state = parent.get_state()
    self._group: list[_Tagged] = []
    self._taken = 0
    self._resume_at = 0  # Entries of the next group already taken before a restore.
    self._bad_run = 0

  def __next__(self) -> Segment:
    while True:
      while self._taken >= len(self._group):
        self._parent_state = self._parent.get_state()
        self._group = next(self._parent)
        self._taken, self._resume_at = self._resume_at, 0
      source, position, entry = self._group[self._taken]
      self._taken += 1
      self._counts.take(source, position, entry)
      if not isinstance(entry, Bad):
        self._bad_run = 0
        return entry
      self._skip(entry)

  def _skip(self, bad: Bad) -> None:
    if not self._skip_bad:
      raise BadRecordError(f"{bad.origin}: {bad.reason} "
                           "(set config.data.skip_bad_records=True to skip and count such records)")
    self._counts.skipped += 1
    self._bad_run += 1
    if self._counts.skipped <= _LOGGED_SKIPS:
      log.warning("skipping bad record %s: %s", bad.origin, bad.reason)
    if self._bad_run >= self._patience:
      raise ValueError(f"the last {self._bad_run} records were all bad, as many as an epoch "
                       f"holds; the last: {bad.origin}: {bad.reason}")

  def get_state(self) -> dict[str, Any]:
    # Right after a restore nothing is taken yet and the position is still `_resume_at`.
    return {"parent": self._parent_state, "taken": self._taken + self._resume_at,
            **self._counts.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._parent_state = state["parent"]
    self._group, self._taken, self._resume_at = [], 0, state["taken"]
    self._counts.restore(state)
    self._bad_run = 0
