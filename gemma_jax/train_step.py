"""One training step as a pure jitted function of (TrainState, batch), and its eval twin.

The step differentiates the state's `params` and updates them with the optimizer; `frozen`
(a LoRA run's base) only feeds the forward pass. Parameters, gradients and optimizer moments
all take the layout's parameter shardings (gemma_jax.train_state.RunLayout), so every device
holds 1/N of each (ZeRO-3 over the fsdp axis).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from gemma_jax import sharding
from gemma_jax.model import Transformer
from gemma_jax.train_state import RunLayout, TrainState

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_weights")
# loss_fn(model, batch, rng) -> (sum, weight) or (sum, weight, extras): extras is a dict of
# further per-example sums (e.g. correct predictions) that the step reports divided by weight.
LossFn = Callable[[Transformer, dict, jax.Array], tuple[jax.Array, ...]]


def split_loss(out: tuple) -> tuple[jax.Array, jax.Array, dict]:
  """(sum, weight, extras) from a LossFn's (sum, weight) or (sum, weight, extras)."""
  total, weight, *rest = out
  return total, weight, (rest[0] if rest else {})


def jit_train_step(layout: RunLayout, loss_fn: LossFn, schedule: optax.Schedule, *,
                   microbatches: int = 1, batch_keys: tuple[str, ...] = BATCH_KEYS):
  """step(state, batch) -> (state, metrics), jitted with the layout's shardings; the old
  state is donated (updated in place)."""
  batch = {k: sharding.batch_sharding(layout.mesh) for k in batch_keys}
  return jax.jit(make_train_step(layout, loss_fn, schedule, microbatches),
                 in_shardings=(layout.shardings, batch),
                 out_shardings=(layout.shardings, sharding.replicated(layout.mesh)),
                 donate_argnums=0)


def make_train_step(layout: RunLayout, loss_fn: LossFn, schedule: optax.Schedule,
                    microbatches: int = 1):
  """The pure step. Gradients of the summed loss are accumulated over `microbatches` slices
  of the batch and divided by the total weight once, so k microbatches give the same update
  as one big batch. A non-finite loss or gradient skips the update."""
  loss_and_grads = _loss_and_grads(layout, loss_fn, microbatches)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    total, weight, extras, grads = loss_and_grads(state, batch, rng)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    loss, grad_norm = total / denom, optax.global_norm(grads)
    updates, opt_state = layout.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), step=state.step + 1)
    metrics = {"loss": loss, "tokens": weight, "grad_norm": grad_norm,
               "learning_rate": schedule(state.step), "skipped": ~finite,
               **{k: v / denom for k, v in extras.items()}}
    return new_state, metrics

  return step


def _loss_and_grads(layout: RunLayout, loss_fn: LossFn, microbatches: int):
  """(state, batch, rng) -> (loss sum, weight, extras sums, gradient sums w.r.t. params)."""

  def loss_sum(params, state, batch, rng):
    model = layout.model(state.replace(params=params).model_params())
    total, weight, extras = split_loss(loss_fn(model, batch, rng))
    return total, (weight, extras)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def whole(state, batch, rng):
    (total, (weight, extras)), grads = grad_fn(state.params, state, batch, rng)
    return total, weight, extras, grads

  if microbatches == 1:
    return whole

  def accumulate(state, batch, rng):
    # Row r of microbatch j is row r * k + j: each device keeps its own rows.
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                *x.shape[1:]).swapaxes(0, 1)
    micro_batches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zero = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)
    extras_shape = jax.eval_shape(loss_sum, state.params, state, first, rng)[1][1]
    zero_extras = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), extras_shape)

    def one(carry, inputs):
      micro, key = inputs
      total, weight, extras, grads = whole(state, micro, key)
      acc_total, acc_weight, acc_extras, acc_grads = carry
      acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
      acc_extras = jax.tree.map(jnp.add, acc_extras, extras)
      return (acc_total + total, acc_weight + weight, acc_extras, acc_grads), None

    keys = jax.random.split(rng, microbatches)
    init = (jnp.float32(0), jnp.float32(0), zero_extras, zero(state.params))
    return jax.lax.scan(one, init, (micro_batches, keys))[0]

  return accumulate


def jit_eval_step(layout: RunLayout, loss_fn: LossFn, batch_keys: tuple[str, ...] = BATCH_KEYS):
  """eval(model_params, batch) -> (loss sum, weight, extras sums), with no gradient and a
  fixed rng, in eval mode (no dropout); model_params is a state's `model_params()`."""

  def step(params, batch):
    model = layout.model(params)
    model.eval()  # deterministic=True: LoRA dropout off
    return split_loss(loss_fn(model, batch, jax.random.key(0)))

  batch = {k: sharding.batch_sharding(layout.mesh) for k in batch_keys}
  return jax.jit(step, in_shardings=(layout.shardings.model_params(), batch),
                 out_shardings=sharding.replicated(layout.mesh))
