"""Continuous batching: requests join and leave a fixed set of decode slots at every step.

The engine keeps `max_batch` slots, one KV cache row of `cache_len` positions per slot (the
model's cache layout with a per-row write index: position j of a row holds its request's
token j) and every slot's sampling settings as device arrays [max_batch], so a new mix of
requests never recompiles. Between decode steps the worker thread:
1. frees the slots of finished and cancelled requests;
2. prefills waiting prompts into free slots, split as in JetStream: `_prefill` runs one prompt,
   right-padded to a power-of-two bucket and cut in chunks of at most `prefill_chunk` tokens,
   into a row cache of its own; `_insert` copies that row into the slot and samples the first
   token. At most `prefill_chunk` prompt tokens are read between two steps, so a long prompt
   does not stall the running requests;
3. runs `_generate`: up to `steps_per_dispatch` tokens for every slot in one device call
   (free slots masked; one step while a free slot could take a waiting prompt; the call ends
   once a slot finishes if requests wait), then streams each request's new text and checks
   stop strings on the host (RowText); tokens decoded past a host-side stop are dropped.

A row never depends on the other rows: its cache row, its masks and its sampling key (its
seed folded with its token count, as in the Sampler) are its own, and every step has the same
shapes, so a request gives the same tokens whatever else is running. Single device: a
sampler's mesh is not used here.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import sampler as sampling
from gemma_jax.model import KVCache, init_cache
from gemma_jax.model.cache import RING_FIELDS
from gemma_jax.serving.engine import BaseEngine, Job

DEFAULT_PREFILL_CHUNK = 256
# Decode steps per device call: the host's per-call work (dispatch, reading the tokens,
# streaming) is paid once for them all. A request arriving meanwhile waits at most this many
# steps; a slot that finishes while others wait ends the call at once.
DEFAULT_STEPS_PER_DISPATCH = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """The decode state of every slot, [max_batch] each."""

  rows: sampling.RowSettings
  count: jax.Array  # tokens generated so far
  last: jax.Array  # the token to feed next
  active: jax.Array  # decoding (False: free, finished, or stopped by the host)


def _empty_slots(batch: int) -> Slots:
  zeros = lambda dtype=jnp.int32: jnp.zeros((batch,), dtype)  # distinct buffers: donatable
  return Slots(rows=jax.tree.map(jnp.asarray, sampling.row_settings([], batch)), count=zeros(),
               last=zeros(), active=zeros(bool))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, params, cache: KVCache, tokens, length):
  """One chunk tokens [1, C] (its first `length` real) at the row cache's index: the cache
  and the logits [1, V] after the chunk's last real token (the first token's, for the last)."""
  model = nnx.merge(graphdef, params)
  column = jnp.arange(tokens.shape[1])[None]
  positions = cache.index[:, None] + column
  features, cache = model.cached_features(tokens, positions,
                                          (column < length).astype(jnp.int32), cache)
  last = jax.lax.dynamic_slice_in_dim(features, jnp.maximum(length - 1, 0), 1, axis=1)
  return cache, model.logits(last)[:, 0]


@functools.partial(jax.jit, donate_argnames=("cache", "slots"))
def _insert(cache: KVCache, slots: Slots, row: KVCache, logits, slot, length,
            settings: sampling.RowSettings, stop_ids):
  """Put a prefilled row (cache of one row, first-token logits [1, V]) into `slot`; sample its
  first token. (cache, slots, token [1], logprob [1], still running [1])."""
  at = lambda a, lead: (0,) * lead + (slot,) + (0,) * (a.ndim - lead - 1)
  kv = lambda big, small: jax.lax.dynamic_update_slice(big, small, at(big, 1))
  # The slot's earlier request left its positions behind: segment 0 hides them all.
  per_slot = lambda big, small: jax.lax.dynamic_update_slice(big.at[slot].set(0), small,
                                                             at(big, 0))
  copy = {f: (kv if getattr(cache, f).ndim == 5 else per_slot)(getattr(cache, f), getattr(row, f))
          for f in ("k", "v", "positions", "segment_ids", *RING_FIELDS)
          if getattr(cache, f) is not None}
  cache = dataclasses.replace(cache, index=cache.index.at[slot].set(length), **copy)
  token, logprob = sampling.sample_rows(logits, settings, jnp.zeros((1,), jnp.int32))
  running = ~jnp.isin(token, stop_ids) & (settings.max_new > 1)
  put = lambda a, x: a.at[slot].set(x[0])
  slots = Slots(rows=jax.tree.map(put, slots.rows, settings), count=put(slots.count, [1]),
                last=put(slots.last, token), active=put(slots.active, running))
  return cache, slots, token, logprob, running


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"),
                   donate_argnames=("cache", "slots"))
def _generate(graphdef, params, cache: KVCache, slots: Slots, free, stop_ids, limit, waiting,
              *, steps: int):
  """Up to `limit` (<= steps) tokens for every active slot not in `free` [B] (slots the host
  frees now), in one dispatch; it ends early when no slot is active, or, while requests
  wait, as soon as a slot finishes (so the host refills it at once).
  (cache, slots, tokens [steps, B], logprobs [steps, B], live [steps, B]: which slots
  produced a token at each step; a slot's tokens are its first live steps)."""
  model = nnx.merge(graphdef, params)
  b = slots.last.shape[0]
  slots = dataclasses.replace(slots, active=slots.active & ~free)
  out = (jnp.zeros((steps, b), jnp.int32), jnp.zeros((steps, b), jnp.float32),
         jnp.zeros((steps, b), bool))

  def step(carry):
    i, cache, slots, out, _ = carry
    live = slots.active
    features, cache = model.cached_features(slots.last[:, None], cache.index[:, None],
                                            live[:, None].astype(jnp.int32), cache)
    token, logprob = sampling.sample_rows(model.logits(features)[:, 0], slots.rows,
                                          slots.count)
    count = slots.count + live
    stop = jnp.isin(token, stop_ids) | (count >= slots.rows.max_new)
    slots = Slots(rows=slots.rows, count=count, last=jnp.where(live, token, slots.last),
                  active=live & ~stop)
    out = tuple(o.at[i].set(x) for o, x in zip(out, (token, logprob, live)))
    return i + 1, cache, slots, out, (live & stop).any()

  def more(carry):
    i, _, slots, _, finished = carry
    return (i < limit) & slots.active.any() & ~(waiting & finished)

  _, cache, slots, out, _ = jax.lax.while_loop(more, step, (0, cache, slots, out, False))
  return cache, slots, *out


@dataclasses.dataclass
class _Row:
  """One prompt of a job on the host: its text so far and, while prefilling, its row cache."""

  job: Job
  index: int  # the row within its job
  prompt: list[int]
  params: sampling.SamplingParams
  text: sampling.RowText
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  cache: KVCache | None = None
  logits: jax.Array | None = None  # after the last prompt token, once prefilled
  read: int = 0  # prompt tokens prefilled so far


class ContinuousEngine(BaseEngine):
  """`max_batch` decode slots of `cache_len` positions (prompt + new tokens) each."""

  def __init__(self, sampler: sampling.Sampler, *, max_batch: int = 16, max_queue: int = 64,
               cache_len: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH):
    super().__init__(sampler, max_batch=max_batch, max_queue=max_queue)
    longest = sampler.config.max_seq_len
    self.cache_len = min(cache_len or longest, longest)
    if self.cache_len < 2 or prefill_chunk <= 0 or steps_per_dispatch <= 0:
      raise ValueError(f"cache_len must be at least 2, prefill_chunk and steps_per_dispatch "
                       f"positive, got {self.cache_len}, {prefill_chunk}, "
                       f"{steps_per_dispatch}")
    self.steps_per_dispatch = steps_per_dispatch
    self.prefill_chunk = sampling.bucket(prefill_chunk, least=sampling.MIN_BUCKET)
    self._stop_ids = jnp.asarray(sampler.stop_ids)
    self._stop_set = set(sampler.stop_ids.tolist())
    self._slots: list[_Row | None] = [None] * max_batch
    self._pending: collections.deque[_Row] = collections.deque()  # started jobs' rows
    self._filling: _Row | None = None
    self._free = np.zeros(max_batch, bool)  # slots for the device to drop at the next step
    self._reset()

  def _reset(self) -> None:
    self._cache = init_cache(self.sampler.config, self.max_batch, self.cache_len, per_row=True)
    self._state = _empty_slots(self.max_batch)

  @property
  def context(self) -> int:
    return self.cache_len

  @property
  def waiting(self) -> int:
    return self._queue.qsize() + len({id(r.job) for r in self._pending})

  @property
  def active(self) -> int:
    return sum(row is not None for row in self._slots)

  def submit(self, job: Job) -> None:
    for i, (prompt, params) in enumerate(zip(job.prompts, job.params)):
      if not prompt or len(prompt) + params.max_new_tokens > self.cache_len:
        raise ValueError(f"prompt {i}: {len(prompt)} tokens + {params.max_new_tokens} new "
                         f"tokens do not fit the engine's {self.cache_len} positions")
    super().submit(job)

  def _loop(self) -> None:
    while not self._stop.is_set():
      try:
        self._drop_cancelled()
        self._admit()
        if self.active:
          self._step()
        elif self._filling is None and not self._pending:
          self._take(self._next_job(0.1))
      except Exception as e:  # noqa: BLE001 -- reported to every request; the engine goes on
        self._fail(e)

  # --------------------------------------------------------------------------- admission

  def _take(self, job: Job | None) -> None:
    if job is not None:
      text = lambda p, sp: sampling.RowText(p, sp, self.sampler.tokenizer)
      self._pending.extend(_Row(job, i, p, sp, text(p, sp))
                           for i, (p, sp) in enumerate(zip(job.prompts, job.params)))

  def _admit(self) -> None:
    """Prefill waiting rows into free slots, at most prefill_chunk prompt tokens (one chunk
    at least) per call."""
    budget = self.prefill_chunk
    while budget > 0 and None in self._slots:
      if self._filling is None:
        if not self._pending:
          self._take(self._next_job(0))
        if not self._pending:
          return
        self._filling = self._pending.popleft()
      budget -= self._prefill_chunk(self._filling)
      if self._filling.read >= len(self._filling.prompt):
        row, self._filling = self._filling, None
        self._insert(row)

  def _prefill_chunk(self, row: _Row) -> int:
    """Read the next chunk of row's prompt into its row cache; the chunk's width."""
    n = len(row.prompt)
    width = min(sampling.bucket(n), self.cache_len)
    size = min(width, self.prefill_chunk)
    if row.cache is None:
      row.cache = init_cache(self.sampler.config, 1, width, per_row=True,
                             ring=self._cache.ring)  # the slots' layout, to insert into
    chunk = np.zeros((1, size), np.int32)
    real = row.prompt[row.read:row.read + size]
    chunk[0, :len(real)] = real
    row.cache, row.logits = _prefill(self.sampler.graphdef, self.sampler.params, row.cache,
                                     chunk, np.int32(len(real)))
    row.read += size
    return size

  def _insert(self, row: _Row) -> None:
    slot = self._slots.index(None)
    settings = jax.tree.map(jnp.asarray, sampling.row_settings([row.params], 1))
    self._cache, self._state, token, logprob, running = _insert(
        self._cache, self._state, row.cache, row.logits, np.int32(slot),
        np.int32(len(row.prompt)), settings, self._stop_ids)
    row.cache = row.logits = None
    self._slots[slot] = row
    self._free[slot] = False
    token, logprob, running = jax.device_get((token, logprob, running))
    self._emit(slot, row, [int(token[0])], [float(logprob[0])], bool(running[0]))

  # --------------------------------------------------------------------------- decoding

  def _step(self) -> None:
    """Decode up to steps_per_dispatch tokens per slot; one step only while a free slot
    could take a waiting prompt (admission goes on between single steps)."""
    free, self._free = self._free, np.zeros(self.max_batch, bool)
    waiting = self._filling is not None or self.waiting > 0
    limit = 1 if waiting and None in self._slots else self.steps_per_dispatch
    self._cache, self._state, tokens, logprobs, live = _generate(
        self.sampler.graphdef, self.sampler.params, self._cache, self._state, free,
        self._stop_ids, np.int32(limit), np.bool_(waiting), steps=self.steps_per_dispatch)
    tokens, logprobs, live, running = jax.device_get(
        (tokens, logprobs, live, self._state.active))
    for slot, row in enumerate(self._slots):
      if row is not None and (n := int(live[:, slot].sum())):
        self._emit(slot, row, tokens[:n, slot].tolist(), logprobs[:n, slot].tolist(),
                   bool(running[slot]))

  def _emit(self, slot: int, row: _Row, tokens: list[int], logprobs: list[float],
            running: bool) -> None:
    """Record a row's new tokens, send their delta (one per dispatch), free its slot once
    it has finished."""
    row.tokens.extend(tokens)
    row.logprobs.extend(logprobs)
    delta = row.text.update(row.index, np.asarray(row.tokens, np.int32),
                            np.asarray(row.logprobs, np.float32), not running,
                            not running and tokens[-1] in self._stop_set)
    if delta is not None and not row.job.cancelled:
      row.job.on_delta(delta)
    if row.text.completion is not None:  # done on the device, or a stop string
      self._release(slot)

  def _release(self, slot: int) -> None:
    self._slots[slot] = None
    self._free[slot] = True

  def _drop_cancelled(self) -> None:
    for slot, row in enumerate(self._slots):
      if row is not None and row.job.cancelled:
        self._release(slot)
    if any(r.job.cancelled for r in self._pending):
      self._pending = collections.deque(r for r in self._pending if not r.job.cancelled)
    if self._filling is not None and self._filling.job.cancelled:
      self._filling = None

  def _fail(self, error: Exception) -> None:
    """Report an engine failure to every request it holds and start afresh."""
    rows = [r for r in (*self._slots, self._filling, *self._pending) if r is not None]
    for job in {id(r.job): r.job for r in rows}.values():
      job.on_error(error)
    self._slots = [None] * self.max_batch
    self._pending.clear()
    self._filling = None
    self._free[:] = False
    self._reset()
