"""Batched generation with a KV cache: one jitted prefill, then a jitted decode loop.

Prompts are left-padded into one batch (padding is segment 0 and positions count from each
row's first real token), so a row's tokens do not depend on the padding or on the other rows:
sampling keys are per row (its seed folded with its token count), and masks come from slot
positions (see model/cache.py). The prefill writes the whole prompt batch into the cache and
samples every row's first token; decoding runs up to `chunk_size` steps per jitted call in a
`lax.while_loop` that exits once every row is done. Between chunks the host streams new text
and looks for stop strings, which cannot be matched reliably on token ids.

Shapes are bucketed (batch, prompt length and new-token budget rounded up to powers of two)
so a server sees few compilations; `min_width` sets the smallest prompt bucket (RLHF: one
compiled prefill for every step). On a mesh the batch is sharded over `batch_axes` (default:
sharding.batch_axes, as in training); the parameters are used with whatever sharding they
already have (they must live on the mesh).

On a mesh that spans several processes (hosts) every process passes its own prompt rows and
gets their completions: the batch is assembled as one global array from the processes' rows
(no host ever holds the others'), the shapes are agreed on (the largest of every process's),
and decoding goes on until every row of every process is done. That test is a reduction over
the whole batch computed on the devices, so every device and every host runs the same number
of decode steps; a bad prompt on one host stops all of them with its error.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax import distributed, sharding
from gemma_jax.model import CACHE_AXES, KVCache, Transformer, init_cache
from gemma_jax.tokenizer import Tokenizer

EOS_ID = 1
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one row is sampled. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first one

  def __post_init__(self):
    _check(self, "max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens > 0,
           "a positive int")
    _check(self, "temperature", _is_number(self.temperature) and self.temperature >= 0,
           "a number >= 0")
    _check(self, "top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0")
    _check(self, "top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")
    _check(self, "seed", _is_int(self.seed) and 0 <= self.seed < 2**32, "an int in [0, 2**32)")
    _check(self, "stop", isinstance(self.stop, tuple)
           and all(isinstance(s, str) and s for s in self.stop), "a tuple of non-empty strings")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (_is_int(x) or isinstance(x, (float, np.floating))) and bool(np.isfinite(x))


def _check(params: SamplingParams, field: str, ok: bool, expected: str) -> None:
  if not ok:
    raise ValueError(f"SamplingParams.{field} must be {expected}, got {getattr(params, field)!r}")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One finished row. tokens include the stop token (EOS / <end_of_turn>) or, for a stop
  string, the token that completed it; text (None without a tokenizer) drops control tokens
  and everything from the stop string on. logprobs[i] = log softmax(raw logits)[tokens[i]]:
  the model's own distribution (temperature 1, unfiltered), as a training forward pass sees it.
  finish_reason: "stop" (stop token or string) or "length" (max_new_tokens reached)."""

  prompt_tokens: list[int]
  tokens: list[int]
  logprobs: list[float]
  text: str | None
  finish_reason: str


@dataclasses.dataclass(frozen=True)
class Delta:
  """What one row produced since the last update; `completion` is set once it has finished."""

  row: int
  text: str
  tokens: list[int]
  completion: Completion | None = None


# ----------------------------------------------------------------------------- sampling rules


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """logits [B, V] with tokens outside the top_k (0 = all) and then outside the top_p nucleus
  (the most likely tokens whose mass reaches top_p, renormalised after top-k) set to -inf.
  Tokens tied with the last one kept are kept too."""
  vocab = logits.shape[-1]
  desc = jnp.sort(logits, axis=-1, descending=True)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
  in_top_k = jnp.arange(vocab) < k
  desc = jnp.where(in_top_k, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # top_p = 1 keeps everything even where float rounding makes the cumulative mass reach 1 early.
  keep = in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1))
  cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next token per row [B] int32: argmax where temperature is 0, else a draw (with that
  row's key) from softmax(logits / temperature) restricted by `filter_logits`."""
  hot = temperature > 0
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw():
    scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]
    filtered = filter_logits(scaled, top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

  # The sort in filter_logits is the costly part: skip it when every row is greedy.
  sampled = jax.lax.cond(jnp.any(hot), draw, lambda: greedy)
  return jnp.where(hot, sampled, greedy)


# ----------------------------------------------------------------------------- device loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
  """Per-row sampling settings as arrays [B] (padding rows have max_new 0)."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  max_new: jax.Array
  seed: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Everything the decode loop carries; all but the cache are [B] or [B, max_new]."""

  cache: KVCache
  rows: RowSettings
  last: jax.Array  # the token to feed next
  position: jax.Array  # its position
  count: jax.Array  # tokens generated so far
  done: jax.Array
  stopped: jax.Array  # done because of a stop token
  tokens: jax.Array  # [B, max_new] generated ids
  logprobs: jax.Array  # [B, max_new]


def row_settings(params: Sequence[SamplingParams], batch: int) -> RowSettings:
  """Host arrays [batch] of params' settings; rows past len(params) are padding (max_new 0)."""
  column = lambda f, dtype: np.array([f(p) for p in params] + [0] * (batch - len(params)),
                                     dtype)
  return RowSettings(temperature=column(lambda p: p.temperature, np.float32),
                     top_k=column(lambda p: p.top_k, np.int32),
                     top_p=column(lambda p: p.top_p, np.float32),
                     max_new=column(lambda p: p.max_new_tokens, np.int32),
                     seed=column(lambda p: p.seed, np.uint32))


def sample_rows(logits: jax.Array, rows: RowSettings, count: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """(token, its logprob) per row [B]: each row's key is its seed folded with its count of
  tokens so far, so a row's draws depend on nothing else (not its row number, not the batch)."""
  keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(rows.seed, count)
  token = sample_tokens(logits, keys, rows.temperature, rows.top_k, rows.top_p)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
  return token, logprob


def _advance(state: DecodeState, logits: jax.Array, stop_ids: jax.Array) -> DecodeState:
  """Sample from logits [B, V], record the token for rows still running, update done."""
  rows = state.rows
  token, logprob = sample_rows(logits, rows, state.count)
  live = ~state.done
  batch = jnp.arange(token.shape[0])
  slot = jnp.where(live, state.count, state.tokens.shape[1])  # finished rows: write dropped
  count = state.count + live
  hit_stop = live & jnp.isin(token, stop_ids)
  return dataclasses.replace(
      state, last=token, position=state.position + 1, count=count,
      done=state.done | hit_stop | (count >= rows.max_new), stopped=state.stopped | hit_stop,
      tokens=state.tokens.at[batch, slot].set(token, mode="drop"),
      logprobs=state.logprobs.at[batch, slot].set(logprob, mode="drop"))


def _constrain(state: DecodeState, mesh: Mesh | None, batch_axes: tuple[str, ...]):
  """Keep every batch dimension sharded over batch_axes (the cache's axes say where it is)."""
  if mesh is None:
    return state
  spec = lambda axes: NamedSharding(
      mesh, PartitionSpec(*(batch_axes if a == "batch" else None for a in axes)))
  shardings = jax.tree.map(lambda x: spec(("batch",) + (None,) * (x.ndim - 1)), state)
  shardings = dataclasses.replace(
      shardings, cache=KVCache(**{f: spec(axes) for f, axes in CACHE_AXES.items()
                                  if getattr(state.cache, f) is not None}))
  return jax.lax.with_sharding_constraint(state, shardings)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "max_new", "mesh",
                                             "batch_axes", "ring"))
def _prefill(graphdef, params, tokens, lengths, rows: RowSettings, stop_ids, *,
             cache_length: int, max_new: int, mesh, batch_axes, ring: bool = True
             ) -> DecodeState:
  """Run the left-padded prompts [B, T] (real lengths [B]) and sample each first token."""
  model = nnx.merge(graphdef, params)
  batch, width = tokens.shape
  start = (width - lengths)[:, None]
  column = jnp.arange(width)[None]
  segment_ids = (column >= start).astype(jnp.int32)
  positions = jnp.maximum(column - start, 0)
  cache = init_cache(model.config, batch, cache_length, ring=None if ring else False)
  features, cache = model.cached_features(tokens, positions, segment_ids, cache)
  zeros = jnp.zeros((batch,), jnp.int32)
  state = DecodeState(
      cache=cache, rows=rows, last=zeros, position=lengths - 1, count=zeros,
      done=rows.max_new <= 0, stopped=zeros.astype(bool),
      tokens=jnp.zeros((batch, max_new), jnp.int32),
      logprobs=jnp.zeros((batch, max_new), jnp.float32))
  state = _advance(state, model.logits(features[:, -1:])[:, 0], stop_ids)
  return _constrain(state, mesh, batch_axes)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "batch_axes"),
                   donate_argnames=("state",))
def _decode(graphdef, params, state: DecodeState, stop_ids, finished, num_steps, *, mesh,
            batch_axes) -> DecodeState:
  """Up to num_steps decode steps; rows in `finished` [B] (stopped by the host) stay done."""
  model = nnx.merge(graphdef, params)

  def step(carry):
    i, s = carry
    features, cache = model.cached_features(s.last[:, None], s.position[:, None], None, s.cache)
    s = dataclasses.replace(s, cache=cache)
    return i + 1, _advance(s, model.logits(features)[:, 0], stop_ids)

  def running(carry):
    i, s = carry
    return (i < num_steps) & ~jnp.all(s.done) & (s.cache.index < s.cache.length)

  state = dataclasses.replace(state, done=state.done | finished)
  _, state = jax.lax.while_loop(running, step, (0, state))
  return _constrain(state, mesh, batch_axes)


@jax.jit
def _all_done(done: jax.Array, finished: jax.Array) -> jax.Array:
  """Whether every row of the whole batch is done on the devices or finished by the host:
  one value on every device and process, so that all stop decoding together."""
  return jnp.all(done | finished)


# ----------------------------------------------------------------------------- host side


def bucket(n: int, least: int = MIN_BUCKET) -> int:
  """Round up to a power of two (at least `least`) to bound the number of compilations."""
  return max(least, 1 << (max(n, 1) - 1).bit_length())


class RowText:
  """Host-side view of one row: stop strings, final truncation and streamed text deltas."""

  def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer | None):
    self.prompt, self.params, self.tokenizer = prompt, params, tokenizer
    self.sent_text, self.sent_tokens = "", 0
    self.completion: Completion | None = None

  def update(self, row: int, tokens: np.ndarray, logprobs: np.ndarray, done: bool,
             stopped: bool) -> Delta | None:
    """The delta since the last update (None if nothing new); finishes the row when due."""
    if self.completion is not None:
      return None
    text = self._decode(tokens)
    cut = self._stop_string_cut(tokens, text)
    if cut is not None:
      tokens, logprobs, text = tokens[:cut[0]], logprobs[:cut[0]], text[:cut[1]]
      done, stopped = True, True
    if done:
      self.completion = Completion(list(self.prompt), tokens.tolist(), logprobs.tolist(), text,
                                   "stop" if stopped else "length")
      return self._delta(row, text or "", tokens)
    delta = self._delta(row, self._safe_prefix(text), tokens)
    return delta if delta.text or delta.tokens else None
  def _decode(self, tokens: np.ndarray) -> str | None:
    return None if self.tokenizer is None else self.tokenizer.decode(tokens, skip_control=True)

  def _stop_string_cut(self, tokens: np.ndarray, text: str | None) -> tuple[int, int] | None:
    """(tokens to keep, text length to keep) at the earliest stop string, if any."""
    hits = [text.find(s) for s in self.params.stop] if text is not None else []
    hits = [h for h in hits if h >= 0]
    if not hits:
      return None
    first = min(hits)
    stop = next(s for s in self.params.stop if text.find(s) == first)
    kept = next(n for n in range(1, len(tokens) + 1)
                if self._decode(tokens[:n]).find(stop, first) == first)
    return kept, first

  def _safe_prefix(self, text: str | None) -> str:
    """Text that later tokens cannot change: no trailing partial character, no stop prefix."""
    if text is None:
      return ""
    text = text.rstrip("\ufffd")
    for s in self.params.stop:
      for n in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:n]):
          text = text[:-n]
          break
    return text

  def _delta(self, row: int, text: str, tokens: np.ndarray) -> Delta:
    new_text = ""
    if text.startswith(self.sent_text):  # SentencePiece text only grows; guard anyway
      new_text, self.sent_text = text[len(self.sent_text):], text
    new_tokens, self.sent_tokens = tokens[self.sent_tokens:].tolist(), len(tokens)
    return Delta(row, new_text, new_tokens, self.completion)


class Sampler:
  """Generates from a Transformer (optionally on a mesh) with a tokenizer for text in/out.

  Text prompts are encoded with BOS; token-id prompts are used as given. Rows stop at any id
  in stop_token_ids (default: EOS and, if the tokenizer has it, <end_of_turn>). To sample
  with updated weights (RL), assign `sampler.params` a state of the same structure and
  shardings: the compiled prefill/decode are reused. ring_cache=False keeps full-length
  caches for sliding-window layers too (the reference the ring buffer is measured against).
  """

  def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, *,
               mesh: Mesh | None = None, batch_axes: tuple[str, ...] | None = None,
               stop_token_ids: Sequence[int] | None = None, chunk_size: int = 16,
               min_width: int = MIN_BUCKET, ring_cache: bool = True):
    self.ring_cache = ring_cache
    self.graphdef, self.params = nnx.split(model)
    self.config = model.config
    self.tokenizer = tokenizer
    if mesh is not None and batch_axes is None:
      batch_axes = sharding.batch_axes(mesh)
    if mesh is not None and (missing := [a for a in batch_axes if a not in mesh.axis_names]):
      raise ValueError(f"batch_axes {missing} are not axes of the mesh {mesh.axis_names}")
    self.mesh, self.batch_axes = mesh, tuple(batch_axes or ())
    if stop_token_ids is None:
      stop_token_ids = _default_stop_ids(tokenizer)
    self.stop_ids = np.asarray(stop_token_ids, np.int32).reshape(-1)
    if chunk_size <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    self.chunk_size = chunk_size
    self.min_width = bucket(min_width)
    # Several hosts: each passes its own rows, and every shape must agree.
    self._processes = (len({d.process_index for d in mesh.devices.flat})
                       if mesh is not None else 1)
    shards = int(np.prod([mesh.shape[a] for a in self.batch_axes])) if mesh is not None else 1
    if shards % self._processes:
      raise ValueError(f"the batch axes {self.batch_axes} of the mesh {dict(mesh.shape)} have "
                       f"{shards} shards, which {self._processes} processes cannot split")
    self._local_shards = shards // self._processes

  def generate(self, prompts: Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
               ) -> list[Completion]:
    """One Completion per prompt, in order."""
    completions: list[Completion | None] = [None] * len(prompts)
    for deltas in self.stream(prompts, params):
      for delta in deltas:
        if delta.completion is not None:
          completions[delta.row] = delta.completion
    return completions

  def stream(self, prompts: Sequence[str | Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
             ) -> Iterator[list[Delta]]:
    """Deltas after the prefill and after each decode chunk, until every row has finished.
    With several processes, every process must call it (with its own rows)."""
    prompt_ids, row_params = self._checked(prompts, params)
    if not prompt_ids and self._processes == 1:
      return
    rows = [RowText(ids, p, self.tokenizer) for ids, p in zip(prompt_ids, row_params)]
    state = self.prefill(prompt_ids, row_params)
    while True:
      count, done, stopped, tokens, logprobs = (self._host(x) for x in (
          state.count, state.done, state.stopped, state.tokens, state.logprobs))
      deltas = [row.update(i, tokens[i, :count[i]], logprobs[i, :count[i]], done[i], stopped[i])
                for i, row in enumerate(rows)]
      yield [d for d in deltas if d is not None]
      finished = [row.completion is not None for row in rows]
      if bool(_all_done(state.done, self._put(self._row_mask(finished, done.shape[0])))):
        return
      state = self.decode(state, self.chunk_size, finished=finished)

  def _checked(self, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
    """Encoded prompts and one SamplingParams per row; a ValueError naming the first bad
    prompt (with several processes: on every process, if any process's rows are bad)."""
    error = prompt_ids = row_params = None
    try:
      prompt_ids = [self.encode(p) for p in prompts]
      row_params = self._row_params(params, len(prompt_ids))
      for i, (ids, p) in enumerate(zip(prompt_ids, row_params)):
        self.check_fits(len(ids), p.max_new_tokens, f"prompt {i}")
        if p.stop and self.tokenizer is None:
          raise ValueError(f"prompt {i}: stop strings need a tokenizer")
    except ValueError as e:
      if self._processes == 1:
        raise
      error = str(e)
    if self._processes > 1:
      distributed.raise_together(error)
    return prompt_ids, row_params

  def encode(self, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token ids instead")
      ids = self.tokenizer.encode(prompt, add_bos=True)
    else:
      ids = [int(i) for i in prompt]
    if not ids:
      raise ValueError("empty prompt: give at least one token (e.g. BOS)")
    if bad := [i for i in ids if not 0 <= i < self.config.vocab_size]:
      raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary "
                       f"[0, {self.config.vocab_size})")
    return ids

  def check_fits(self, prompt_length: int, max_new_tokens: int, what: str = "prompt") -> None:
    """Raise if the prompt plus max_new_tokens exceeds the model's max_seq_len."""
    limit = self.config.max_seq_len
    if prompt_length + max_new_tokens > limit:
      raise ValueError(f"{what}: {prompt_length} prompt tokens + max_new_tokens "
                       f"{max_new_tokens} exceed the context of {limit} tokens")

  def _row_params(self, params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
      return [params] * n
    params = list(params)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
      raise ValueError(f"params: give one SamplingParams or a list of {n}, got {params!r}")
    return params

  def prefill(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> DecodeState:
    """The decode state after running the prompts and sampling each row's first token.

    Low level (stream/generate wrap it): no checks, rows past len(prompt_ids) are padding.
    """
    batch, width, max_new = self._shape(prompt_ids, params)
    tokens = np.zeros((batch, width), np.int32)
    for i, ids in enumerate(prompt_ids):
      tokens[i, width - len(ids):] = ids
    lengths = np.zeros(batch, np.int32)
    lengths[:len(prompt_ids)] = list(map(len, prompt_ids))
    rows = row_settings(params, batch)
    return _prefill(self.graphdef, self.params, self._put(tokens), self._put(lengths),
                    self._put(rows), self.stop_ids, cache_length=width + max_new,
                    max_new=max_new, mesh=self.mesh, batch_axes=self.batch_axes,
                    ring=self.ring_cache)

  def decode(self, state: DecodeState, num_steps: int,
             finished: Sequence[bool] = ()) -> DecodeState:
    """Up to num_steps more tokens per running row (state is donated: use the result).

    finished[i] marks row i done (e.g. by a stop string the host found).
    """
    mask = self._row_mask(finished, state.done.shape[0] // self._processes)
    return _decode(self.graphdef, self.params, state, self.stop_ids, self._put(mask), num_steps,
                   mesh=self.mesh, batch_axes=self.batch_axes)

  def _shape(self, prompt_ids: list[list[int]], params: list[SamplingParams]
             ) -> tuple[int, int, int]:
    """(this process's padded rows, prompt width, new-token budget), agreed by all
    processes: the largest of each; rows a multiple of the batch shards a process holds."""
    batch = bucket(len(prompt_ids), least=1)
    batch = -(-batch // self._local_shards) * self._local_shards
    width = max(bucket(max(map(len, prompt_ids), default=1)), self.min_width)
    max_new = bucket(max((p.max_new_tokens for p in params), default=1))
    if self._processes > 1:
      batch, width, max_new = distributed.max_over_processes((batch, width, max_new))
    return batch, width, max_new

  @staticmethod
  def _row_mask(values: Sequence[bool], rows: int) -> np.ndarray:
    mask = np.zeros(rows, bool)
    mask[:len(values)] = values
    return mask

  def _put(self, tree):
    """This process's rows onto the mesh as global arrays, batch dimension first (a no-op
    without a mesh)."""
    if self.mesh is None:
      return tree
    sharding = NamedSharding(self.mesh, PartitionSpec(self.batch_axes))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (x.shape[0] * self._processes, *x.shape[1:])), tree)

  def _host(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a batch array of the decode state."""
    return np.asarray(x) if self.mesh is None else sharding.host_rows(x)


def _default_stop_ids(tokenizer: Tokenizer | None) -> list[int]:
  if tokenizer is None:
    return [EOS_ID]
  ids = [tokenizer.eos_id]
  try:
    ids.append(tokenizer.end_of_turn_id)
  except ValueError:  # a tokenizer without turn tokens
    pass
  return ids
