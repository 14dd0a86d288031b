"""KV-cache decoding and the sampler: cache vs full recomputation, sampling rules, stops, mesh."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from gemma_jax.config import get_config
from gemma_jax.model import abstract_model, init_cache
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import Sampler, SamplingParams, filter_logits, sample_tokens
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece
from model_utils import random_model, random_tokens

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"


def jit_random_model(name, seed):
  """model_utils.random_model built under one jit: eager init is slow on a busy CPU."""
  cfg = get_config(name, dtype="float32")
  graphdef, _ = nnx.split(abstract_model(cfg))
  return cfg, nnx.merge(graphdef, jax.jit(lambda: nnx.state(random_model(name, seed)[1]))())


@pytest.fixture(scope="module")
def tiny():
  return jit_random_model("tiny_gemma3", seed=1)  # window 8, local and global layers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return Tokenizer(train_sentencepiece([CORPUS], tmp_path_factory.mktemp("spm") / "t", 512))


def ragged(prompts, width, left=False):
  """Tokens, positions and segment ids [B, width] of prompts padded on the left or right."""
  tokens, positions, segments = (np.zeros((len(prompts), width), np.int32) for _ in range(3))
  for row, p in enumerate(prompts):
    cols = slice(width - len(p), width) if left else slice(0, len(p))
    tokens[row, cols], positions[row, cols], segments[row, cols] = p, np.arange(len(p)), 1
  return tokens, positions, segments


def jitted(model):
  """model(tokens, positions, segment_ids[, cache]) compiled once per shape."""
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))
  return lambda *args: run(params, *args)


def full_logits(model, seqs):
  """Uncached logits of each sequence, via one right-padded batch: a list of [len, V]."""
  width = max(map(len, seqs))
  logits = np.asarray(jitted(model)(*ragged(seqs, width)))
  return [logits[row, :len(s)] for row, s in enumerate(seqs)]


@pytest.mark.parametrize("name", ["tiny_gemma3",
                                  pytest.param("tiny_gemma2", marks=pytest.mark.slow)])
def test_cached_logits_match_full_recompute(name, tiny):
  """Prefill a ragged batch (left or right padded, one prompt longer than the window of 8),
  then decode step by step: every logit equals the uncached full-sequence forward pass."""
  cfg, model = tiny if name == "tiny_gemma3" else jit_random_model(name, seed=1)
  lengths, steps, width = (13, 4, 9), 7, 13
  seqs = [random_tokens(cfg, (n + steps,), seed=n) for n in lengths]
  want = full_logits(model, seqs)
  run = jitted(model)
  for left in (True, False):
    tokens, positions, segments = ragged([s[:n] for s, n in zip(seqs, lengths)], width, left)
    logits, cache = run(tokens, positions, segments, init_cache(cfg, 3, width + steps))
    got = [[np.asarray(logits)[row, segments[row] == 1]] for row in range(3)]
    for t in range(steps):
      step_tokens = np.array([[s[n + t]] for s, n in zip(seqs, lengths)], np.int32)
      step_positions = np.array([[n + t] for n in lengths], np.int32)
      logits, cache = run(step_tokens, step_positions, np.ones_like(step_tokens), cache)
      for row in range(3):
        got[row].append(np.asarray(logits)[row])
    for row in range(3):
      np.testing.assert_allclose(np.concatenate(got[row]), want[row], rtol=0,
                                 atol=2e-5 * np.abs(want[row]).max(), err_msg=f"{left=} {row=}")


def naive_greedy(model, prompts, n):
  """Argmax continuations by re-running every whole sequence each step (no cache)."""
  seqs = [list(p) for p in prompts]
  width = max(map(len, prompts)) + n
  run = jitted(model)
  for _ in range(n):
    logits = np.asarray(run(*ragged(seqs, width)))
    for row, seq in enumerate(seqs):
      seq.append(int(np.argmax(logits[row, len(seq) - 1])))
  return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def test_greedy_batch_matches_naive_recompute(tiny):
  cfg, model = tiny
  prompts = [random_tokens(cfg, (n,), seed=n).tolist() for n in (3, 12, 10)]
  out = Sampler(model, stop_token_ids=[]).generate(prompts, SamplingParams(max_new_tokens=10))
  assert [c.tokens for c in out] == naive_greedy(model, prompts, 10)
  assert all(c.finish_reason == "length" for c in out)
  assert [c.prompt_tokens for c in out] == prompts
  # logprobs are the model's log-softmax at each generated token
  for c, logits in zip(out, full_logits(model, [p + c.tokens for p, c in zip(prompts, out)])):
    logp = jax.nn.log_softmax(logits[len(c.prompt_tokens) - 1:-1])
    want = np.take_along_axis(np.asarray(logp), np.array(c.tokens)[:, None], -1)[:, 0]
    np.testing.assert_allclose(c.logprobs, want, atol=1e-5)


def test_greedy_deterministic_and_top_k_1_is_greedy(tiny):
  cfg, model = tiny
  sampler = Sampler(model, stop_token_ids=[])
  prompts = [random_tokens(cfg, (n,), seed=n).tolist() for n in (9, 14, 4)]
  first = sampler.generate(prompts, SamplingParams(max_new_tokens=12))
  assert first == sampler.generate(prompts, SamplingParams(max_new_tokens=12))
  top1 = sampler.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1,
                                                  seed=3))
  assert [c.tokens for c in top1] == [c.tokens for c in first]


def test_seeded_sampling_is_reproducible_and_padding_independent(tiny):
  cfg, model = tiny
  sampler = Sampler(model, stop_token_ids=[])
  prompts = [random_tokens(cfg, (n,), seed=n).tolist() for n in (9, 14, 11)]
  hot = lambda seed: SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
  a = sampler.generate(prompts, [hot(1), hot(2), hot(3)])
  assert a == sampler.generate(prompts, [hot(1), hot(2), hot(3)])
  b = sampler.generate(prompts, [hot(4), hot(5), hot(6)])
  assert [c.tokens for c in a] != [c.tokens for c in b]
  # A row alone (other padding, no neighbours) samples exactly what it did in the batch.
  alone = sampler.generate(prompts[1:2], [hot(2)])[0]
  assert alone.tokens == a[1].tokens
  np.testing.assert_allclose(alone.logprobs, a[1].logprobs, atol=1e-5)


def test_top_k_top_p_filter_on_hand_built_distribution():
  probs = np.array([0.15, 0.5, 0.1, 0.25])  # sorted: 0.5 (1), 0.25 (3), 0.15 (0), 0.1 (2)
  logits = jnp.log(jnp.asarray(np.tile(probs, (6, 1)), jnp.float32))
  top_k = jnp.array([0, 0, 0, 0, 2, 3])
  top_p = jnp.array([0.5, 0.7, 0.8, 1.0, 0.9, 0.7])
  kept = np.isfinite(np.asarray(filter_logits(logits, top_k, top_p)))
  assert kept.tolist() == [
      [False, True, False, False],  # 0.5 alone reaches 0.5
      [False, True, False, True],  # 0.5 + 0.25 reaches 0.7
      [True, True, False, True],
      [True, True, True, True],
      [False, True, False, True],  # top-2, whose mass is all kept at 0.9
      [False, True, False, True],  # top-3 renormalised: 0.56, 0.28 reach 0.7
  ]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 3, 0.9)])
def test_sampling_frequencies_match_softmax(temperature, top_k, top_p):
  """Chi-square: draws follow softmax(logits / T) restricted to the kept tokens."""
  logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5], np.float32)
  n = 20_000
  keys = jax.random.split(jax.random.key(0), n)
  tokens = sample_tokens(jnp.tile(logits, (n, 1)), keys, jnp.full(n, temperature),
                         jnp.full(n, top_k), jnp.full(n, top_p))
  counts = np.bincount(np.asarray(tokens), minlength=len(logits))
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits[None] / temperature),
                                              jnp.array([top_k]), jnp.array([top_p]))))[0]
  assert (counts[~kept] == 0).all() and kept.sum() > 2
  expected = lambda t: np.exp(logits[kept].astype(np.float64) / t) * n / np.exp(
      logits[kept].astype(np.float64) / t).sum()
  assert scipy.stats.chisquare(counts[kept], expected(temperature)).pvalue > 1e-3
  assert scipy.stats.chisquare(counts[kept], expected(1.0)).pvalue < 1e-6  # it has the power


def test_stops_and_per_row_max_new_tokens(tiny, tokenizer):
  _, model = tiny
  sampler = Sampler(model, tokenizer, stop_token_ids=[], chunk_size=3)
  prompts = ["The baker", "The baker kneads the dough", "Bread"]
  budget = lambda **kw: [SamplingParams(max_new_tokens=n, **kw) for n in (5, 9, 16)]
  free = sampler.generate(prompts, budget())
  assert [len(c.tokens) for c in free] == [5, 9, 16]
  assert all(c.finish_reason == "length" for c in free)
  assert free[2].text == tokenizer.decode(free[2].tokens, skip_control=True)

  # A stop string from the middle of row 2's text: cut before it, tokens through it.
  text = free[2].text
  stop = text[len(text) // 2:len(text) // 2 + 2]
  first = text.find(stop)
  cut = sampler.generate(prompts, budget(stop=("@@", stop)))
  assert cut[2].finish_reason == "stop" and cut[2].text == text[:first]
  assert cut[2].tokens == free[2].tokens[:len(cut[2].tokens)]
  assert stop in tokenizer.decode(cut[2].tokens)
  assert stop not in tokenizer.decode(cut[2].tokens[:-1])

  # A stop token ends the row and is kept (it matters for RL log-probs).
  stop_id = free[1].tokens[3]
  by_token = Sampler(model, tokenizer, stop_token_ids=[stop_id]).generate(prompts, budget())[1]
  end = free[1].tokens.index(stop_id) + 1
  assert by_token.tokens == free[1].tokens[:end] and by_token.finish_reason == "stop"


def test_streamed_deltas_add_up_to_the_completion(tiny, tokenizer):
  _, model = tiny
  sampler = Sampler(model, tokenizer, stop_token_ids=[], chunk_size=2)
  params = [SamplingParams(max_new_tokens=11, temperature=1.0, seed=7, stop=("e",)),
            SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=1)]
  text, tokens, done = ["", "", ""], [[], [], []], [None, None, None]
  updates = 0
  for deltas in sampler.stream(["The baker", "The baker kneads the dough", "Bread"], params):
    updates += 1
    for d in deltas:
      assert done[d.row] is None
      text[d.row] += d.text
      tokens[d.row] += d.tokens
      done[d.row] = d.completion
  assert updates > 2
  assert [c.text for c in done] == text and [c.tokens for c in done] == tokens
  assert "e" not in text[0]


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -0.1),
                                         ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("seed", -1), ("stop", ("",)), ("temperature", "1")])
def test_bad_sampling_params_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
    SamplingParams(**{field: value})


def test_prompt_plus_budget_must_fit_the_context(tiny):
  cfg, model = tiny
  prompt = random_tokens(cfg, (cfg.max_seq_len - 3,)).tolist()
  with pytest.raises(ValueError, match="exceed the context of 256"):
    Sampler(model).generate([prompt], SamplingParams(max_new_tokens=4))


def test_sharded_sampling_matches_unsharded(tiny):
  """Batch over data x fsdp, weights sharded over "fsdp" on the embed axis: same samples."""
  cfg, model = tiny
  prompts = [random_tokens(cfg, (n,), seed=n).tolist() for n in (3, 9, 12, 5, 7, 2, 11, 4)]
  # One row per device, each with its own budget: the rows finish at different steps.
  params = [SamplingParams(max_new_tokens=3 + 3 * i, temperature=0.8, top_k=50, seed=i)
            for i in range(len(prompts))]
  want = Sampler(model, stop_token_ids=[]).generate(prompts, params)
  # All 8 emulated devices, batch over data x fsdp: the decode loop's exit test is a
  # reduction over the whole batch, so every device runs the same number of steps.
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  graphdef, state = nnx.split(model)
  spec = lambda v: jax.sharding.PartitionSpec(*("fsdp" if a == "embed" else None for a in v.axes))
  state = jax.device_put(state, jax.tree.map(
      lambda v: jax.sharding.NamedSharding(mesh, spec(v)), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable)))
  sampler = Sampler(nnx.merge(graphdef, state), mesh=mesh, stop_token_ids=[])
  got = sampler.generate(prompts, params)
  assert [c.tokens for c in got] == [c.tokens for c in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
  state = sampler.prefill(prompts, params)
  # The batch splits over the mesh's batch axes (sharding.batch_axes), as in training.
  assert state.cache.k.sharding.spec[1] == ("data", "fsdp")
  assert len(state.cache.k.sharding.device_set) == 8


def test_cached_call_needs_positions(tiny):
  cfg, model = tiny
  with pytest.raises(ValueError, match="positions are required"):
    model(jnp.ones((1, 2), jnp.int32), None, None, init_cache(cfg, 1, 4))


def test_decode_loop_exit_is_reduced_over_every_device(tiny):
  """The decode while_loop's condition all-reduces `done` over all 8 devices: no device
  decides from its own rows (which would let devices run different trip counts)."""
  from launch import hlo

  cfg, model = tiny
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sampler = Sampler(model, mesh=mesh, stop_token_ids=[])
  prompts = [random_tokens(cfg, (4,), seed=i).tolist() for i in range(8)]
  state = sampler.prefill(prompts, [SamplingParams(max_new_tokens=4)] * 8)
  text = sampler_lib._decode.lower(
      sampler.graphdef, sampler.params, state, sampler.stop_ids, sampler._put(np.zeros(8, bool)),
      4, mesh=mesh, batch_axes=sampler.batch_axes).compile().as_text()
  module = hlo.parse_module(text)
  outer = [ins for ins in module.computations[module.entry].instructions.values()
           if ins.opcode == "while"]
  condition = dict(hlo.called(outer[-1]))["condition"]
  reductions = [c for c in hlo.audit(text).collectives if c.computation == condition]
  assert [(c.kind, c.group_size, c.dtype) for c in reductions] == [("all-reduce", 8, "pred")]
