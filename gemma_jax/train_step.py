"""The train state, its ZeRO-3 shardings, and one training step as a pure jitted function.

State is a plain dict {params, opt_state, step, rng}: params is the model's parameter pure
dict, opt_state the optax state whose moment trees mirror params. Parameters, gradients and
optimizer moments all take the parameter shardings (sharding.tree_shardings_like), so every
device holds 1/N of each (ZeRO-3 over the fsdp axis).

LoRA runs (a `lora` LoRAConfig) add "frozen": params is then only the adapters (what gets
gradients and optimizer moments) and frozen the base, possibly quantized (gemma_jax.lora);
`model_params(state)` is the whole model's parameter dict (what eval and sampling use).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import lora as lora_lib
from gemma_jax import sharding
from gemma_jax.config import ModelConfig
from gemma_jax.losses import chunked_cross_entropy, vocab_parallel_cross_entropy
from gemma_jax.model import Transformer, init_model

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_weights")
# loss_fn(model, batch, rng) -> (sum, weight) or (sum, weight, extras): extras is a dict of
# further per-example sums (e.g. correct predictions) that the step reports divided by weight.
LossFn = Callable[[Transformer, dict, jax.Array], tuple[jax.Array, ...]]
# (ModelConfig, seed) -> the module a task trains (default a Transformer; the reward trainer
# builds a Transformer with a value head).
ModelFn = Callable[[ModelConfig, int], nnx.Module]


def build_model(cfg: ModelConfig, seed: int, make_model: ModelFn = init_model,
                lora: lora_lib.LoRAConfig | None = None, base: dict | None = None) -> nnx.Module:
  """The module a run trains: make_model(cfg, seed), its parameters replaced by `base` (a
  pure dict, e.g. from init_from) when given, plus LoRA adapters (and a quantized base)."""
  model = make_model(cfg, seed)
  if base is not None:
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(base)
    nnx.update(model, state)
  if lora is not None:
    lora_lib.apply(model, lora, seed=seed)
  return model


def _init_fn(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
             make_model: ModelFn = init_model, lora: lora_lib.LoRAConfig | None = None):
  """init(base=None) -> the train state; `base` (pure dict) replaces the random weights."""

  def init(base=None):
    model = build_model(cfg, seed, make_model, lora, base)
    start = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}
    if lora is None:
      params = nnx.state(model, nnx.Param).to_pure_dict()
      return {"params": params, "opt_state": optimizer.init(params), **start}
    params = nnx.state(model, lora_lib.TRAINABLE).to_pure_dict()
    frozen = nnx.state(model, lora_lib.FROZEN).to_pure_dict()
    return {"params": params, "frozen": frozen, "opt_state": optimizer.init(params), **start}
  return init


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    make_model: ModelFn = init_model, lora: lora_lib.LoRAConfig | None = None):
  """NamedShardings for every leaf of the train state (params, grads' twins, moments; LoRA:
  adapters and the frozen base take the rule table's shardings of their logical axes)."""
  abstract = jax.eval_shape(_init_fn(cfg, optimizer, 0, make_model, lora))
  model = nnx.eval_shape(lambda: build_model(cfg, 0, make_model, lora))
  rep = sharding.replicated(mesh)
  out = {"step": rep, "rng": rep}
  if lora is None:
    params = sharding.param_shardings(nnx.split(model)[1], mesh)
  else:
    _, trainable, frozen = nnx.split(model, lora_lib.TRAINABLE, lora_lib.FROZEN)
    params = sharding.param_shardings(trainable, mesh)
    out["frozen"] = sharding.param_shardings(frozen, mesh)
  return {"params": params,
          "opt_state": sharding.tree_shardings_like(abstract["opt_state"], abstract["params"],
                                                    params, mesh), **out}


def abstract_train_state(cfg, optimizer, mesh, make_model: ModelFn = init_model,
                         lora: lora_lib.LoRAConfig | None = None):
  """ShapeDtypeStructs with shardings: what AOT compilation and checkpoint restore need."""
  shapes = jax.eval_shape(_init_fn(cfg, optimizer, 0, make_model, lora))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, state_shardings(cfg, optimizer, mesh, make_model, lora))


def init_train_state(cfg: ModelConfig, optimizer, mesh: Mesh, seed: int,
                     make_model: ModelFn = init_model, lora: lora_lib.LoRAConfig | None = None,
                     base: dict | None = None):
  """Initialise directly into shards: no host ever holds the whole model. base: a parameter
  pure dict of make_model's model (sharded; donated) to start from instead of random."""
  shardings = state_shardings(cfg, optimizer, mesh, make_model, lora)
  init = jax.jit(_init_fn(cfg, optimizer, seed, make_model, lora), out_shardings=shardings,
                 donate_argnums=0 if base is not None else ())
  if base is None:
    return init(), shardings
  with warnings.catch_warnings():
    # A quantized base has other shapes than the donated float one: nothing to alias, but
    # donating still frees the float copy.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return init(base), shardings


def model_graphdef(cfg: ModelConfig, make_model: ModelFn = init_model,
                   lora: lora_lib.LoRAConfig | None = None):
  """The graphdef that `model_params(state)` (or state["params"] alone) merges with."""
  return nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0, make_model, lora)))[0]


def model_params(state: dict) -> dict:
  """The whole model's parameter pure dict: state["params"], plus state["frozen"] (the base of
  a LoRA run) when present. Works on trees of arrays, shardings or ShapeDtypeStructs."""
  frozen = state.get("frozen")
  return state["params"] if frozen is None else _deep_merge(frozen, state["params"])


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def split_loss(out: tuple) -> tuple[jax.Array, jax.Array, dict]:
  """(sum, weight, extras) from a LossFn's (sum, weight) or (sum, weight, extras)."""
  total, weight, *rest = out
  return total, weight, (rest[0] if rest else {})


def lm_loss(model: Transformer, batch: dict, rng, *, z_loss: float = 0.0,
            mesh: Mesh | None = None, chunk_size: int = 4096):
  """Next-token cross-entropy (sum, weight) from the tied embedding.

  With a mesh whose `tensor` axis is > 1 the vocabulary-parallel shard_map version runs;
  otherwise the chunked jit version. Neither materialises full-vocabulary logits.
  """
  # rng: LoRA dropout (a plain Gemma has no dropout and ignores it).
  features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
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
  give the same update as one big batch. A non-finite loss or gradient skips the update.
  A state with "frozen" (LoRA) differentiates and updates only "params" (the adapters)."""

  def loss_sum(params, frozen, batch, rng):
    states = (nnx.State(params),) if frozen is None else (nnx.State(params), nnx.State(frozen))
    total, weight, extras = split_loss(loss_fn(nnx.merge(graphdef, *states), batch, rng))
    return total, (weight, extras)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(params, frozen, batch, rng):
    if microbatches == 1:
      (total, (weight, extras)), grads = grad_fn(params, frozen, batch, rng)
      return total, weight, extras, grads
    # Row r of microbatch j is row r * k + j: each device keeps its own rows.
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                *x.shape[1:]).swapaxes(0, 1)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def one(carry, inputs):
      micro, key = inputs
      (total, (weight, extras)), grads = grad_fn(params, frozen, micro, key)
      acc_total, acc_weight, acc_extras, acc_grads = carry
      acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
      acc_extras = jax.tree.map(jnp.add, acc_extras, extras)
      return (acc_total + total, acc_weight + weight, acc_extras, acc_grads), None

    keys = jax.random.split(rng, microbatches)
    micro_batches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zero_extras = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                               jax.eval_shape(loss_sum, params, frozen, first, rng)[1][1])
    (total, weight, extras, grads), _ = jax.lax.scan(
        one, (jnp.float32(0), jnp.float32(0), zero_extras, zeros), (micro_batches, keys))
    return total, weight, extras, grads

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    total, weight, extras, grads = accumulate(state["params"], state.get("frozen"), batch, rng)
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
    if "frozen" in state:
      new_state["frozen"] = state["frozen"]
    metrics = {"loss": loss, "tokens": weight, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), "skipped": ~finite,
               **{k: v / denom for k, v in extras.items()}}
    return new_state, metrics

  return step


def jit_train_step(step, shardings, mesh: Mesh, batch_keys=BATCH_KEYS):
  """jit with explicit in/out shardings; the old state is donated (updated in place)."""
  batch = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(step, in_shardings=(shardings, batch),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, loss_fn: LossFn):
  """eval(params, batch) -> (loss sum, weight, extras sums), with no gradient and a fixed
  rng; params is the whole model's (`model_params(state)`), run in eval mode (no dropout)."""

  def step(params, batch):
    model = nnx.merge(graphdef, nnx.State(params))
    model.eval()  # deterministic=True: LoRA dropout off
    return split_loss(loss_fn(model, batch, jax.random.key(0)))

  return step


def jit_eval_step(step, param_shardings, mesh: Mesh, batch_keys=BATCH_KEYS):
  batch = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(step, in_shardings=(param_shardings, batch),
                 out_shardings=sharding.replicated(mesh))
