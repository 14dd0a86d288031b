"""RLOO math (gemma_jax/rl.py) against float64 NumPy references, and its model-facing parts
(teacher-forced log-probs, the policy-gradient loss and its gradient) on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import rl, sharding
from gemma_jax.config import get_config
from gemma_jax.model import abstract_model, init_model
from gemma_jax.sampler import Sampler, SamplingParams
from trainers import rlhf

CFG = get_config("tiny_gemma2", dtype="float32")  # final-logit soft-cap on the path
P, K, T = 3, 4, 6


def fixed_inputs():
  rng = np.random.default_rng(0)
  logp = -rng.uniform(0.1, 3.0, (P * K, T))
  ref = -rng.uniform(0.1, 3.0, (P * K, T))
  lengths = rng.integers(1, T + 1, P * K)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
  scores = rng.normal(size=P * K) * 2
  truncated = rng.random(P * K) < 0.4
  return logp, ref, mask, scores, truncated


def numpy_reference(logp, ref, mask, scores, truncated, *, beta, clip, mode, penalty, white):
  """Loops, float64: the formulas of the issue written out one completion at a time."""
  n = len(scores)
  kl = np.array([sum((logp[i, t] - ref[i, t]) * mask[i, t] for t in range(T)) for i in range(n)])
  r = np.array(scores, np.float64)
  if clip:
    r = np.minimum(np.maximum(r, -clip), clip)
  for i in range(n):
    if truncated[i] and mode == "zero":
      r[i] = 0.0
    if truncated[i] and mode == "penalty":
      r[i] -= penalty
  big_r = r - beta * kl
  adv = np.zeros(n)
  for i in range(n):
    group = range(i // K * K, i // K * K + K)
    adv[i] = big_r[i] - sum(big_r[j] for j in group if j != i) / (K - 1)
  if white:
    adv = (adv - adv.mean()) / (adv.std() + 1e-6)
  loss = -np.mean([adv[i] * sum(logp[i, t] * mask[i, t] for t in range(T)) for i in range(n)])
  return kl, big_r, adv, loss


@pytest.mark.parametrize("beta,clip,mode,penalty,white", [
    (0.1, 0.0, "keep", 0.0, False), (0.05, 1.5, "zero", 0.0, False),
    (0.2, 0.0, "penalty", 0.7, True), (0.0, 0.5, "keep", 0.0, True)])
def test_rloo_advantages_and_loss_match_numpy(beta, clip, mode, penalty, white):
  logp, ref, mask, scores, truncated = fixed_inputs()
  kl, big_r, adv, loss = numpy_reference(logp, ref, mask, scores, truncated, beta=beta,
                                         clip=clip, mode=mode, penalty=penalty, white=white)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out = rl.advantages_from(f32(scores), f32(logp), f32(ref), f32(mask), jnp.asarray(truncated),
                           k=K, beta=beta, clip=clip, truncated_mode=mode,
                           truncated_penalty=penalty, whiten_advantages=white)
  np.testing.assert_allclose(out["kl"], kl, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["rewards"], big_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["advantages"], adv, rtol=1e-4, atol=1e-5)
  got = rl.policy_loss(jnp.sum(f32(logp) * f32(mask), axis=1), out["advantages"])
  np.testing.assert_allclose(got, loss, rtol=1e-5, atol=1e-6)
  # RLOO advantages of a group sum to zero (without whitening).
  if not white:
    np.testing.assert_allclose(np.asarray(out["advantages"]).reshape(P, K).sum(1), 0, atol=1e-5)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="k >= 2"):
    rl.rloo_advantages(jnp.zeros(4), 1)
  with pytest.raises(ValueError, match="truncated_mode"):
    rl.shape_rewards(jnp.zeros(4), jnp.zeros(4), jnp.zeros(4, bool), beta=0.1,
                     truncated_mode="drop")


# ----------------------------------------------------------------------------- model side


def rollout_rows(seed=0, n=8):
  """Prompt + completion rows in the learner layout, with random advantages."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(4, CFG.vocab_size, rng.integers(2, 6)).tolist() for _ in range(n)]
  completions = [rng.integers(4, CFG.vocab_size, rng.integers(1, 7)).tolist() for _ in range(n)]
  rows = rlhf.learner_rows(prompts, completions, 16)
  rows["advantages"] = rng.normal(size=n).astype(np.float32)
  return prompts, completions, rows


def reference_token_logprobs(model, rows):
  """log softmax of the full logits (float64 NumPy) at each target, and the entropy."""
  logits = np.asarray(model(jnp.asarray(rows["tokens"]), jnp.asarray(rows["positions"]),
                            jnp.asarray(rows["segment_ids"])), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
  return picked, -(np.exp(logp) * logp).sum(-1)


def test_learner_rows_layout():
  rows = rlhf.learner_rows([[2, 10, 11]], [[20, 21, 1]], 8)
  np.testing.assert_array_equal(rows["tokens"][0], [2, 10, 11, 20, 21, 1, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [10, 11, 20, 21, 1, 0, 0, 0])
  # The targets that are completion tokens: predicted from positions 2, 3, 4.
  np.testing.assert_array_equal(rows["mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 6 + [0, 0])


def test_teacher_forced_logprobs_and_entropy_match_full_logits():
  model = init_model(CFG, seed=1)
  _, _, rows = rollout_rows()
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  logp, ref_logp, entropy = rlhf._teacher_forced(
      graphdef, params, params, *(jnp.asarray(rows[k]) for k in
                                  ("tokens", "positions", "segment_ids", "targets")),
      chunk_size=24)  # chunks that do not divide the 8 x 16 tokens
  want_logp, want_entropy = reference_token_logprobs(model, rows)
  real = rows["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(logp)[real], want_logp[real], atol=2e-5)
  np.testing.assert_allclose(np.asarray(entropy)[real], want_entropy[real], atol=2e-5)
  # Policy == reference: every KL term is exactly zero.
  kl = rl.sequence_kl(logp, ref_logp, jnp.asarray(rows["mask"]))
  np.testing.assert_array_equal(np.asarray(kl), 0.0)


def test_sampler_logprobs_are_the_temperature_one_teacher_forced_ones():
  """The sampler reports log softmax(raw logits) even when sampling at temperature 0.7."""
  model = init_model(CFG, seed=2)
  sampler = Sampler(model, stop_token_ids=[1])
  prompts = [[2, 17, 99, 5], [2, 40]]
  outs = sampler.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7, seed=3))
  rows = rlhf.learner_rows(prompts, [o.tokens for o in outs], 16)
  want, _ = reference_token_logprobs(model, rows)
  for i, o in enumerate(outs):
    np.testing.assert_allclose(o.logprobs, want[i][rows["mask"][i] > 0], atol=1e-4)


def loss_of(model, rows):
  batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids", "targets")}
  batch["loss_weights"] = jnp.asarray(rows["advantages"][:, None] * rows["mask"])
  total, weight = rl.rloo_loss(model, batch, None, chunk_size=24)
  return total / weight


def test_rloo_loss_value_and_gradient():
  """The train-step loss equals -mean_i A_i sum_t log pi (full logits, float64), and its
  gradient matches central finite differences along random unit directions. (float32 only:
  ModelConfig has no float64; eps 1e-2 keeps the rounding error near 1e-5.)"""
  _, _, rows = rollout_rows(seed=4)
  model = init_model(CFG, seed=5)
  logp, _ = reference_token_logprobs(model, rows)
  want = -np.mean(rows["advantages"] * (logp * rows["mask"]).sum(1))
  # A mean of terms of both signs (the advantages): float32 rounding is relative to the terms
  # (~1), not to the small result.
  np.testing.assert_allclose(loss_of(model, rows), want, rtol=1e-5, atol=1e-6)

  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  f = jax.jit(lambda p: loss_of(nnx.merge(graphdef, nnx.State(p)), rows))
  grad = jax.grad(f)(params)
  rng = np.random.default_rng(6)
  for _ in range(3):
    direction = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    norm = np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: jnp.asarray(d / norm, jnp.float32), direction)
    eps = 1e-2
    shift = lambda s: jax.tree.map(lambda x, d: x + s * d, params, direction)
    numeric = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                          jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-3  # a direction that moves the loss
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=2e-4)


def test_scoring_and_loss_on_a_mesh_match_one_device():
  """On a (data 2, fsdp 2, tensor 2) mesh, which splits the rows, the embedding dimension and
  the vocabulary: the teacher-forced log-probs and entropies (split over the rows like the
  batch) and the RLOO loss and its gradient equal the one-device ones."""
  _, _, rows = rollout_rows(seed=7)
  graphdef, params = nnx.split(init_model(CFG, seed=8))
  params = params.to_pure_dict()
  batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids", "targets")}
  batch["loss_weights"] = jnp.asarray(rows["advantages"][:, None] * rows["mask"])

  def run(params, batch):
    logp, _, entropy = rlhf._teacher_forced(
        graphdef, params, params, *(batch[k] for k in ("tokens", "positions", "segment_ids",
                                                       "targets")), chunk_size=24)
    loss = lambda p: rl.rloo_loss(nnx.merge(graphdef, nnx.State(p)), batch, None,
                                  chunk_size=24)[0]
    return logp, entropy, *jax.value_and_grad(loss)(params)

  want = jax.jit(run)(params, batch)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    shardings = sharding.param_shardings(nnx.split(abstract_model(CFG))[1], mesh)
    got = jax.jit(run)(jax.device_put(params, shardings),
                       jax.device_put(batch, sharding.batch_sharding(mesh)))
  real = rows["segment_ids"] > 0
  for g, w in zip(got[:2], want[:2]):
    np.testing.assert_allclose(np.asarray(g)[real], np.asarray(w)[real], atol=2e-5)
  assert got[0].sharding.shard_shape(got[0].shape)[0] == len(real) // 4
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
  # Summed in other orders (the embedding gradient adds ~100 tokens' terms): float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               got[3], want[3])


def test_row_seeds_depend_on_rng_and_step_only():
  key = np.array([0, 7], np.uint32)
  assert rlhf.row_seeds(key, 3, 5) == rlhf.row_seeds(key.copy(), 3, 5)
  assert rlhf.row_seeds(key, 3, 5) != rlhf.row_seeds(key, 4, 5)
  assert rlhf.row_seeds(key, 3, 5) != rlhf.row_seeds(np.array([0, 8], np.uint32), 3, 5)
  assert len(set(rlhf.row_seeds(key, 3, 64))) == 64
