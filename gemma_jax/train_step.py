"""The train state, its ZeRO-3 shardings, and one training step as a pure jitted function.

State is a plain dict {params, opt_state, step, rng}: params is the model's parameter pure
dict, opt_state the optax state whose moment trees mirror params. Parameters, gradients and
optimizer moments all take the parameter shardings (sharding.tree_shardings_like), so every
device holds 1/N of each (ZeRO-3 over the fsdp axis).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import sharding
from gemma_jax.config import ModelConfig
from gemma_jax.losses import chunked_cross_entropy, vocab_parallel_cross_entropy
from gemma_jax.model import Transformer, abstract_model, init_model

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_weights")
LossFn = Callable[[Transformer, dict, jax.Array], tuple[jax.Array, jax.Array]]


def _init_fn(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
  def init():
    params = nnx.state(init_model(cfg, seed), nnx.Param).to_pure_dict()
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}
  return init


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh):
  """NamedShardings for every leaf of the train state (params, grads' twins, moments)."""
  abstract = jax.eval_shape(_init_fn(cfg, optimizer, 0))
  params = sharding.param_shardings(nnx.split(abstract_model(cfg))[1], mesh)
  rep = sharding.replicated(mesh)
  return {"params": params,
          "opt_state": sharding.tree_shardings_like(abstract["opt_state"], abstract["params"],
                                                    params, mesh),
          "step": rep, "rng": rep}


def abstract_train_state(cfg, optimizer, mesh):
  """ShapeDtypeStructs with shardings: what AOT compilation and checkpoint restore need."""
  shapes = jax.eval_shape(_init_fn(cfg, optimizer, 0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, state_shardings(cfg, optimizer, mesh))


def init_train_state(cfg: ModelConfig, optimizer, mesh: Mesh, seed: int):
  """Initialise directly into shards: no host ever holds the whole model."""
  shardings = state_shardings(cfg, optimizer, mesh)
  return jax.jit(_init_fn(cfg, optimizer, seed), out_shardings=shardings)(), shardings


def lm_loss(model: Transformer, batch: dict, rng, *, z_loss: float = 0.0,
            mesh: Mesh | None = None, chunk_size: int = 4096):
  """Next-token cross-entropy (sum, weight) from the tied embedding.

  With a mesh whose `tensor` axis is > 1 the vocabulary-parallel shard_map version runs;
  otherwise the chunked jit version. Neither materialises full-vocabulary logits.
  """
  del rng  # no dropout in Gemma
  features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"])
  table = model.embedder.input_embedding[...]
  kw = dict(final_softcap=model.config.final_logits_softcap, z_loss=z_loss)
  if mesh is not None and mesh.shape["tensor"] > 1:
    return vocab_parallel_cross_entropy(features, table, batch["targets"], batch["loss_weights"],
                                        mesh, **kw)
  return chunked_cross_entropy(features, table, batch["targets"], batch["loss_weights"],
                               chunk_size=chunk_size, **kw)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: LossFn,
                    schedule: optax.Schedule, microbatches: int = 1):
  """step(state, batch) -> (state, metrics). Gradients of the summed loss are accumulated over
  `microbatches` slices of the batch and divided by the total weight once, so k microbatches
  give the same update as one big batch. A non-finite loss or gradient skips the update."""

  def loss_sum(params, batch, rng):
    total, weight = loss_fn(nnx.merge(graphdef, nnx.State(params)), batch, rng)
    return total, weight

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(params, batch, rng):
    if microbatches == 1:
      (total, weight), grads = grad_fn(params, batch, rng)
      return total, weight, grads
    # Row r of microbatch j is row r * k + j: each device keeps its own rows.
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                *x.shape[1:]).swapaxes(0, 1)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def one(carry, inputs):
      micro, key = inputs
      (total, weight), grads = grad_fn(params, micro, key)
      acc_total, acc_weight, acc_grads = carry
      acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
      return (acc_total + total, acc_weight + weight, acc_grads), None

    keys = jax.random.split(rng, microbatches)
    (total, weight, grads), _ = jax.lax.scan(
        one, (jnp.float32(0), jnp.float32(0), zeros), (jax.tree.map(split, batch), keys))
    return total, weight, grads

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    total, weight, grads = accumulate(state["params"], batch, rng)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state["params"])
    loss, grad_norm = total / denom, optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + 1, "rng": state["rng"]}
    metrics = {"loss": loss, "tokens": weight, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), "skipped": ~finite}
    return new_state, metrics

  return step


def jit_train_step(step, shardings, mesh: Mesh, batch_keys=BATCH_KEYS):
  """jit with explicit in/out shardings; the old state is donated (updated in place)."""
  batch = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(step, in_shardings=(shardings, batch),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, loss_fn: LossFn):
  """eval(params, batch) -> (loss sum, weight), with no gradient and a fixed rng."""

  def step(params, batch):
    return loss_fn(nnx.merge(graphdef, nnx.State(params)), batch, jax.random.key(0))

  return step


def jit_eval_step(step, param_shardings, mesh: Mesh, batch_keys=BATCH_KEYS):
  batch = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(step, in_shardings=(param_shardings, batch),
                 out_shardings=sharding.replicated(mesh))
