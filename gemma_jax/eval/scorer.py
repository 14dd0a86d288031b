"""Log-likelihoods of (context, continuation) token pairs, packed into rows and batched.

Each pair is scored as lm-evaluation-harness's causal models score it: the input is
`(context + continuation)[-(max_length + 1):][:-1]` and the result is the sum of log p over
the continuation's tokens and whether each of them is the most likely one. Pairs are
packed first-fit, longest first, into rows of a power-of-two width (segment ids keep them
apart, positions restart), `batch_rows` rows per jitted call; on a mesh the rows are split
over its batch axes and the vocabulary work over `tensor` (losses.token_scores).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import sharding
from gemma_jax.losses import token_scores
from gemma_jax.sampler import bucket

Pair = tuple[Sequence[int], Sequence[int]]
Score = tuple[float, bool]  # (sum of log p, every token greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _score_rows(graphdef, params, tokens, positions, segment_ids, targets, *, chunk_size):
  model = nnx.merge(graphdef, params)
  features = model.features(tokens, positions, segment_ids)
  return token_scores(features, model.embedder.input_embedding[...], targets,
                      final_softcap=model.config.final_logits_softcap, chunk_size=chunk_size)


def pack(lengths: Sequence[int], width: int) -> list[list[int]]:
  """Rows of item indices whose lengths add up to at most `width`: first fit, longest first."""
  rows: list[list[int]] = []
  room: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
    if row is None:
      row = len(rows)
      rows.append([])
      room.append(width)
    rows[row].append(i)
    room[row] -= lengths[i]
  return rows


class Scorer:
  """Scores pairs with a model (on a mesh or one device); see the module docstring."""

  def __init__(self, model: nnx.Module, mesh: Mesh | None = None, *, max_length: int,
               batch_rows: int = 8, chunk_size: int = 4096):
    self.graphdef, self.params = nnx.split(model)
    self.mesh, self.max_length, self.chunk_size = mesh, max_length, chunk_size
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in
                                                 sharding.batch_axes(mesh)]))
    self.batch_rows = -(-batch_rows // shards) * shards

  def score(self, pairs: Sequence[Pair],
            progress: Callable[[int], None] = lambda n: None) -> list[Score]:
    """(sum of log p(continuation | context), all greedy) per pair, in order."""
    seqs = [self._sequence(i, ctx, cont) for i, (ctx, cont) in enumerate(pairs)]
    width = bucket(max((len(s) - 1 for s, _ in seqs), default=1), least=16)
    rows = pack([len(s) - 1 for s, _ in seqs], width)
    out: list[Score | None] = [None] * len(pairs)
    for start in range(0, len(rows), self.batch_rows):
      batch = rows[start:start + self.batch_rows]
      logp, greedy = self._run(self._arrays(batch, seqs, width))
      for r, items in enumerate(batch):
        offset = 0
        for i in items:
          n, scored = len(seqs[i][0]) - 1, seqs[i][1]
          span = slice(offset + n - scored, offset + n)
          out[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(greedy[r, span].all()))
          offset += n
      progress(sum(map(len, batch)))
    return out

  def _sequence(self, i: int, context: Sequence[int], continuation: Sequence[int]):
    """(the tokens, inputs and the last target, and how many targets are scored)."""
    if not continuation:
      raise ValueError(f"request {i}: the continuation has no tokens")
    if len(continuation) > self.max_length:
      raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens exceeds "
                       f"max_length {self.max_length}")
    if not context:
      raise ValueError(f"request {i}: empty context (give at least BOS)")
    return list(context + continuation)[-(self.max_length + 1):], len(continuation)

  def _arrays(self, rows: list[list[int]], seqs, width: int) -> dict[str, np.ndarray]:
    shape = (self.batch_rows, width)
    a = {k: np.zeros(shape, np.int32) for k in ("tokens", "positions", "segment_ids",
                                                "targets")}
    for r, items in enumerate(rows):
      offset = 0
      for s, i in enumerate(items, 1):
        seq = seqs[i][0]
        span = slice(offset, offset + len(seq) - 1)
        a["tokens"][r, span], a["targets"][r, span] = seq[:-1], seq[1:]
        a["positions"][r, span], a["segment_ids"][r, span] = np.arange(len(seq) - 1), s
        offset += len(seq) - 1
    return a

  def _run(self, a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    keys = ("tokens", "positions", "segment_ids", "targets")
    if self.mesh is None:
      args, scope = [a[k] for k in keys], contextlib.nullcontext()
    else:
      batch = sharding.batch_sharding(self.mesh)
      args, scope = [jax.device_put(a[k], batch) for k in keys], jax.set_mesh(self.mesh)
    with scope:
      logp, greedy = _score_rows(self.graphdef, self.params, *args, chunk_size=self.chunk_size)
    return np.asarray(logp), np.asarray(greedy)
