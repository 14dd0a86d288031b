"""Continuous batching: requests join and leave a fixed set of decode slots at every step.

The engine keeps `max_batch` slots, one KV cache row of `cache_len` positions per slot (the
model's cache layout with a per-row write index: position j of a row holds its request's
token j) and every slot's sampling settings as device arrays [max_batch], so a new mix of
requests never recompiles. Between decode steps the worker thread:
1. frees the slots of finished and cancelled requests;
2. prefills waiting prompts into free slots, split as in JetStream: `_prefill` reads a group
   of prompts (several short ones together, or one long one in chunks of `prefill_chunk`
   tokens), right-padded to a power-of-two count of rows and to a width (quarter octaves up
   to `prefill_chunk`: 8, 16, 24, 32, 48, 64, 96, ...; then powers of two: a prefill's time
   goes with its padded tokens, and a group holds prompts of one width), into a cache of
   their own; `_insert` copies those rows into their slots and samples their first tokens. A
   group is padded by repeating its last row, whose copy then writes the same slot twice
   with the same values. At most `prefill_chunk` (padded) prompt tokens are read between
   two steps, so a long prompt does not stall the running requests;
3. runs `_generate`: up to `steps_per_dispatch` tokens for every slot in one device call
   (free slots masked; one step while a free slot could take a waiting prompt; the call ends
   once a slot finishes if requests wait), then streams each request's new text and checks
   stop strings on the host (RowText); tokens decoded past a host-side stop are dropped.

A row never depends on the other rows: its cache row, its masks and its sampling key (its
seed folded with its token count, as in the Sampler) are its own, and every decode step has
the same shapes, so a request gives the same tokens whatever else is running (its prefill
group's shape can only round the last bit of a float differently). Single device: a
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
def _prefill(graphdef, params, cache: KVCache, tokens, lengths):
  """One chunk tokens [G, C] (row i's first lengths[i] real) at the group cache's index: the
  cache and the logits [G, V] after each row's last real token (its first token's, once the
  chunk is its last)."""
  model = nnx.merge(graphdef, params)
  column = jnp.arange(tokens.shape[1])[None]
  positions = cache.index[:, None] + column
  features, cache = model.cached_features(tokens, positions,
                                          (column < lengths[:, None]).astype(jnp.int32), cache)
  last = jnp.take_along_axis(features, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
  return cache, model.logits(last)[:, 0]


@functools.partial(jax.jit, donate_argnames=("cache", "slots"))
def _insert(cache: KVCache, slots: Slots, group: KVCache, logits, slot_ids, lengths,
            settings: sampling.RowSettings, stop_ids):
  """Put the prefilled rows of group (first-token logits [G, V]) into slots slot_ids [G];
  sample their first tokens. (cache, slots, token [G], logprob [G], still running [G])."""
  fields = [f for f in ("k", "v", "positions", "segment_ids", *RING_FIELDS)
            if getattr(cache, f) is not None]
  copy = {f: getattr(cache, f) for f in fields}
  for i, slot in enumerate(slot_ids):  # G is static and small: one update per row
    for f in fields:
      big, lead = copy[f], int(getattr(cache, f).ndim == 5)  # KV stacks: [layers, B, ...]
      small = jax.lax.slice_in_dim(getattr(group, f), i, i + 1, axis=lead)
      if not lead:  # the slot's earlier request left its positions: segment 0 hides them
        big = big.at[slot].set(0)
      copy[f] = jax.lax.dynamic_update_slice(
          big, small, (0,) * lead + (slot,) + (0,) * (big.ndim - lead - 1))
  cache = dataclasses.replace(cache, index=cache.index.at[slot_ids].set(lengths), **copy)
  token, logprob = sampling.sample_rows(logits, settings, jnp.zeros_like(lengths))
  running = ~jnp.isin(token, stop_ids) & (settings.max_new > 1)
  put = lambda a, x: a.at[slot_ids].set(x)
  slots = Slots(rows=jax.tree.map(put, slots.rows, settings),
                count=put(slots.count, jnp.ones_like(lengths)), last=put(slots.last, token),
                active=put(slots.active, running))
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
  """One prompt of a job on the host: its text so far."""

  job: Job
  index: int  # the row within its job
  prompt: list[int]
  params: sampling.SamplingParams
  text: sampling.RowText
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Group:
  """Rows being prefilled together, padded to a power-of-two count by repeating the last;
  `width` is the group cache's length (its prompts' width bucket)."""

  rows: list[_Row]
  padded: list[_Row]
  width: int
  cache: KVCache | None = None
  logits: jax.Array | None = None  # after each row's last prompt token, once read
  read: int = 0  # prompt columns prefilled so far

  @classmethod
  def of(cls, rows: list[_Row], width: int) -> _Group:
    return cls(rows, rows + rows[-1:] * (sampling.bucket(len(rows), least=1) - len(rows)),
               width)

  @property
  def done(self) -> bool:
    return self.read >= max(len(r.prompt) for r in self.rows)


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
    self.widths = self._prompt_widths()
    self._stop_ids = jnp.asarray(sampler.stop_ids)
    self._stop_set = set(sampler.stop_ids.tolist())
    self._slots: list[_Row | None] = [None] * max_batch
    self._pending: collections.deque[_Row] = collections.deque()  # started jobs' rows
    self._filling: _Group | None = None
    self._free = np.zeros(max_batch, bool)  # slots for the device to drop at the next step
    self._device = min(jax.tree.leaves(sampler.params)[0].devices(), key=lambda d: d.id)
    self._reset()

  def _placed(self, tree):
    """tree committed to the weights' device. jit compiles apart for committed and
    uncommitted arguments, and the device calls' outputs are committed when the weights are
    (a loaded checkpoint's): fresh state must be too, or warm_up compiles the wrong kind."""
    return jax.device_put(tree, self._device)

  def _reset(self) -> None:
    self._cache = self._placed(init_cache(self.sampler.config, self.max_batch, self.cache_len,
                                          per_row=True))
    self._state = self._placed(_empty_slots(self.max_batch))

  @property
  def context(self) -> int:
    return self.cache_len

  @property
  def waiting(self) -> int:
    return self._queue.qsize() + len({id(r.job) for r in self._pending})

  @property
  def active(self) -> int:
    return sum(row is not None for row in self._slots)

  def _prompt_widths(self) -> list[int]:
    """The widths a prompt is padded to, up to cache_len: quarter octaves (a quarter of the
    power of two above, 8 at least) up to prefill_chunk, then powers of two (read in
    prefill_chunk chunks)."""
    widths = [min(sampling.MIN_BUCKET, self.cache_len)]
    while (last := widths[-1]) < self.cache_len:
      step = (max(sampling.MIN_BUCKET, sampling.bucket(last + 1) // 4)
              if last < self.prefill_chunk else last)
      widths.append(min(last + step, self.cache_len))
    return widths

  def _width(self, row: _Row) -> int:
    return next(w for w in self.widths if w >= len(row.prompt))

  def group_shapes(self) -> list[tuple[int, int]]:
    """Every (rows, width) of a prefill group `_next_group` can form: short groups hold up
    to bucket(max_batch) rows within the budget, long ones a single row."""
    most = sampling.bucket(self.max_batch, least=1)
    return [(rows, w) for w in self.widths for rows in (1 << i for i in range(most.bit_length()))
            if self._group_fits(rows, w, self.prefill_chunk)]

  def _group_fits(self, rows: int, width: int, budget: int) -> bool:
    """Whether a prefill group of `rows` prompts `width` wide is allowed: one row always
    (read in chunks when long), several when short and their padded tokens fit the budget."""
    return rows == 1 or (width <= self.prefill_chunk
                         and sampling.bucket(rows, least=1) * width <= budget)

  def warm_up(self) -> int:
    """Compile what serving runs (prefill and insert for every group shape, decode) on dummy
    prompts, so no request waits for a compilation; the number of group shapes. Call before
    start()."""
    job = Job([], [], on_delta=lambda _: None, on_error=lambda _: None)
    params = sampling.SamplingParams(max_new_tokens=2)
    shapes = self.group_shapes()
    for rows, width in shapes:
      self._clear()
      dummy = [_Row(job, i, [1] * width, params,
                    sampling.RowText([1] * width, params, self.sampler.tokenizer))
               for i in range(min(rows, self.max_batch))]
      group = _Group.of(dummy, width)  # (a count past max_batch pads to `rows`)
      while not group.done:
        self._prefill_chunk(group)
      self._insert(group)
    self._step()  # the decode step's one shape, on the last group's rows
    self._clear()
    return len(shapes)

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
    """Prefill waiting rows into free slots, at most prefill_chunk padded prompt tokens (one
    chunk at least) per call."""
    budget = self.prefill_chunk
    while budget > 0 and None in self._slots:
      if self._filling is None:
        self._filling = self._next_group(budget)
        if self._filling is None:
          return
      budget -= self._prefill_chunk(self._filling)
      if self._filling.done:
        group, self._filling = self._filling, None
        self._insert(group)

  def _next_row(self) -> _Row | None:
    if not self._pending:
      self._take(self._next_job(0))
    return self._pending[0] if self._pending else None

  def _next_group(self, budget: int) -> _Group | None:
    """The waiting rows to prefill together: one long prompt (read in chunks), or as many
    short ones of the first one's width as there are free slots and the budget's rows x
    width hold (joining a wider group would cost a row its padding)."""
    rows, free, width = [], self._slots.count(None), None
    while len(rows) < free and (row := self._next_row()) is not None:
      if rows and (self._width(row) != width
                   or not self._group_fits(len(rows) + 1, width, budget)):
        break
      rows.append(self._pending.popleft())
      width = self._width(row)
      if width > self.prefill_chunk:  # a long prompt goes alone
        break
    return _Group.of(rows, width) if rows else None

  def _prefill_chunk(self, group: _Group) -> int:
    """Read the next chunk of the group's prompts into its cache; the padded tokens read."""
    size = min(group.width, self.prefill_chunk)
    if group.cache is None:
      group.cache = self._placed(init_cache(self.sampler.config, len(group.padded),
                                            group.width, per_row=True,
                                            ring=self._cache.ring))  # the slots' layout
    chunk = np.zeros((len(group.padded), size), np.int32)
    lengths = np.zeros(len(group.padded), np.int32)
    for i, row in enumerate(group.padded):
      real = row.prompt[group.read:group.read + size]
      chunk[i, :len(real)], lengths[i] = real, len(real)
    # A short group is read in one chunk, so no row's logits come from a chunk past its end.
    group.cache, group.logits = _prefill(self.sampler.graphdef, self.sampler.params,
                                         group.cache, chunk, lengths)
    group.read += size
    return chunk.size

  def _insert(self, group: _Group) -> None:
    slots = [i for i, row in enumerate(self._slots) if row is None][:len(group.rows)]
    slot_ids = np.array(slots + slots[-1:] * (len(group.padded) - len(slots)), np.int32)
    settings = jax.tree.map(jnp.asarray,
                            sampling.row_settings([r.params for r in group.padded],
                                                  len(group.padded)))
    self._cache, self._state, token, logprob, running = _insert(
        self._cache, self._state, group.cache, group.logits, slot_ids,
        np.array([len(r.prompt) for r in group.padded], np.int32), settings, self._stop_ids)
    token, logprob, running = jax.device_get((token, logprob, running))
    for i, (slot, row) in enumerate(zip(slots, group.rows)):
      self._slots[slot] = row
      self._free[slot] = False
      self._emit(slot, row, [int(token[i])], [float(logprob[i])], bool(running[i]))

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
    if self._filling is not None and all(r.job.cancelled for r in self._filling.rows):
      self._filling = None  # (a group's other cancelled rows leave their slots once in)

  def _fail(self, error: Exception) -> None:
    """Report an engine failure to every request it holds and start afresh."""
    filling = self._filling.rows if self._filling is not None else []
    rows = [r for r in (*self._slots, *filling, *self._pending) if r is not None]
    for job in {id(r.job): r.job for r in rows}.values():
      job.on_error(error)
    self._clear()

  def _clear(self) -> None:
    """Empty every slot, the waiting rows and the cache."""
    self._slots = [None] * self.max_batch
    self._pending.clear()
    self._filling = None
    self._free[:] = False
    self._reset()
