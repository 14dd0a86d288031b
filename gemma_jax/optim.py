"""AdamW with a warmup + decay schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(opt: Mapping, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optimizer.learning_rate, then cosine/linear decay to
  learning_rate * end_lr_fraction at total_steps, or constant."""
  peak, warmup = float(opt["learning_rate"]), int(opt["warmup_steps"])
  kind = opt["schedule"]
  if kind not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={kind!r}; choose one of {SCHEDULES}")
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f"optimizer.warmup_steps={warmup} must be in [0, train.steps={total_steps}]")
  end = peak * float(opt["end_lr_fraction"])
  decay_steps = max(total_steps - warmup, 1)
  decay = {
      "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0),
      "linear": optax.linear_schedule(peak, end, decay_steps),
      "constant": optax.constant_schedule(peak),
  }[kind]
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params, decay_embedding: bool, decay_norms: bool):
  """True where weight decay applies: matrices always, the embedding and norm scales by choice."""

  def decays(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if "input_embedding" in names:
      return decay_embedding
    if names[-1] == "scale":
      return decay_norms
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: Mapping, total_steps: int) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
  """(optimizer, schedule) from the `optimizer` config section."""
  schedule = learning_rate_schedule(opt, total_steps)
  mask = lambda params: weight_decay_mask(params, bool(opt["decay_embedding"]),
                                          bool(opt["decay_norms"]))
  chain = []
  if opt["grad_clip_norm"]:
    chain.append(optax.clip_by_global_norm(float(opt["grad_clip_norm"])))
  chain.append(optax.adamw(schedule, b1=float(opt["b1"]), b2=float(opt["b2"]),
                           eps=float(opt["eps"]), weight_decay=float(opt["weight_decay"]),
                           mask=mask))
  return optax.chain(*chain), schedule
