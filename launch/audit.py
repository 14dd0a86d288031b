"""What a compiled step should move between chips under ZeRO-3, beside what it does move.

`expected_traffic(layout)` is the per-chip ICI traffic per step of an ideal ZeRO-3 step on
the layout's mesh, with the ring factors launch.hlo counts (n = the devices an array is split
over, d = the devices it is replicated over):
  all-gather      every sharded weight, (n-1)/n of it in the compute dtype, twice in a train
                  step (the forward; the backward, whose rematerialised forward reuses that
                  gather) and once in a decode step;
  reduce-scatter  every trainable sharded parameter's gradient, (n-1)/n of it in its dtype;
  all-reduce      every trainable parameter's shard that is replicated over d > 1 devices,
                  2 (d-1)/d of it (the data-parallel gradient sum).
Activations of a batch split over (data, fsdp) need nothing else; `tensor` > 1 adds its own.

`check(audit, layout, ...)` compares an audit's totals with that and lists every collective
that moves a [tokens, vocab] tensor (an array with a vocabulary-sized dimension that is not a
table: its other dimensions are not the embedding's). A ZeRO-3 step has none, and its total
stays within `FACTOR` of the expectation either way: XLA may write a reduce-scatter as an
all-reduce plus a slice, or gather a float32 weight before its cast, each doubling a term.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from gemma_jax.train_state import RunLayout
from launch import hlo

FACTOR = 3.0  # measured total / expected total must lie in [1 / FACTOR, FACTOR]


def _split(sharding) -> tuple[int, int]:
  """(n devices an array is split over, d devices each shard is replicated on)."""
  mesh, spec = sharding.mesh, sharding.spec
  axes = [a for entry in spec if entry is not None
          for a in (entry if isinstance(entry, tuple) else (entry,))]
  n = math.prod(mesh.shape[a] for a in axes)
  return n, mesh.size // n


def expected_traffic(layout: RunLayout, *, decode: bool = False) -> dict[str, float]:
  """{kind: bytes per chip per step} of an ideal ZeRO-3 step (see the module docstring)."""
  compute = np.dtype(layout.cfg.dtype).itemsize
  out = {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": 0.0}
  weights = layout.abstract.model_params()
  for leaf in jax.tree.leaves(weights):
    n, _ = _split(leaf.sharding)
    itemsize = min(compute, leaf.dtype.itemsize)  # quantized codes stay as they are
    out["all-gather"] += (1 if decode else 2) * leaf.size * itemsize * (n - 1) / n
  if not decode:
    for leaf in jax.tree.leaves(layout.abstract.params):
      n, d = _split(leaf.sharding)
      out["reduce-scatter"] += leaf.size * leaf.dtype.itemsize * (n - 1) / n
      out["all-reduce"] += 2 * leaf.size * leaf.dtype.itemsize / n * (d - 1) / d
  return out


def logits_collectives(audit: hlo.Audit, layout: RunLayout) -> list[hlo.Collective]:
  """The collectives that move a [tokens, vocab]-shaped tensor (not a table or its shard)."""
  cfg, mesh = layout.cfg, layout.mesh
  vocab = {cfg.vocab_size, cfg.vocab_size // mesh.shape["tensor"]}
  embed = {cfg.embed_dim // k for k in (1, mesh.shape["fsdp"], mesh.size)}
  found = []
  for c in audit.collectives:
    for array in c.result + c.operands:
      rest = list(array.dims)
      hit = next((d for d in rest if d in vocab), None)
      if hit is None:
        continue
      rest.remove(hit)
      if any(d not in embed and d != 1 for d in rest):
        found.append(c)
        break
  return found


def check(audit: hlo.Audit, layout: RunLayout, *, decode: bool = False) -> dict:
  """The audit's totals per kind beside the ZeRO-3 expectation; `ok` when the total is within
  FACTOR of it and no collective moves a [tokens, vocab] tensor."""
  expected = expected_traffic(layout, decode=decode)
  totals = audit.totals()
  measured = sum(t.traffic_bytes for t in totals.values())
  want = sum(expected.values())
  ratio = measured / want if want else float("inf") if measured else 1.0
  logits = logits_collectives(audit, layout)
  return {"measured_bytes": {k: t.traffic_bytes for k, t in totals.items()},
          "measured_count": {k: t.count for k, t in totals.items()},
          "expected_bytes": expected, "ratio": ratio,
          "logits_collectives": [f"{c.kind} {'+'.join(map(str, c.result))} x{c.executions}"
                                 for c in logits],
          "ok": 1 / FACTOR <= ratio <= FACTOR and not logits}
