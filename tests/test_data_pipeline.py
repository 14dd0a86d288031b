"""gemma_jax.data: packing, formats, determinism, per-process shards, checkpointed state.

Expected arrays are written out by hand from the batch contract in gemma_jax/data/__init__.py.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from gemma_jax.data import default_config, make_dataset, make_iterator

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "tokenizer_corpus.txt"
BOS, EOS = 2, 1
KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_weights")


def config(sources, **overrides):
  c = default_config()
  c.sources = sources
  c.shuffle, c.num_epochs = False, 1
  for key, value in overrides.items():
    c[key] = value
  return c


def docs(*token_lists):
  """An in-memory source of pre-tokenized documents."""
  return [{"records": [{"tokens": list(t)} for t in token_lists]}]


def batches(c, tok, n=None, **kwargs):
  it = iter(make_dataset(c, tok, **kwargs))
  return list(it) if n is None else [next(it) for _ in range(n)]


def assert_batch(batch, expected):
  assert set(batch) == set(expected)
  for key, want in expected.items():
    np.testing.assert_array_equal(batch[key], np.asarray(want), err_msg=key)
    assert batch[key].dtype == (np.float32 if "loss_weights" in key else np.int32), key


# --- packing on hand-built documents ------------------------------------------------------

A, B, C, D, E = [10, 11, 12], [20, 21, 22, 23, 24, 25], [30], [40, 41], [50, 51, 52]


def test_concat_packing_splits_documents_across_rows(tok):
  # Documents (with BOS/EOS) of 5, 8, 3 and 4 tokens, concatenated and cut every 6.
  out = batches(config(docs(A, B, C, D), seq_len=6, batch_size=2, packing="concat"), tok)
  assert len(out) == 2
  assert_batch(out[0], dict(
    tokens=[[2, 10, 11, 12, 1, 2], [20, 21, 22, 23, 24, 25]],
    positions=[[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5]],
    segment_ids=[[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 1]],
    targets=[[10, 11, 12, 1, 0, 0], [21, 22, 23, 24, 25, 0]],
    loss_weights=[[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]))
  assert_batch(out[1], dict(
    tokens=[[1, 2, 30, 1, 2, 40], [41, 1, 0, 0, 0, 0]],
    positions=[[0, 0, 1, 2, 0, 1], [0, 1, 0, 0, 0, 0]],
    segment_ids=[[1, 2, 2, 2, 3, 3], [1, 1, 0, 0, 0, 0]],
    targets=[[0, 30, 1, 0, 40, 0], [1, 0, 0, 0, 0, 0]],
    loss_weights=[[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]]))


def test_first_fit_packing_keeps_documents_whole(tok):
  # Two bins of 8: A+C share a row, B fills one; D does not fit, so both are emitted.
  c = config(docs(A, B, C, D, E), seq_len=8, batch_size=2, packing="first_fit", packing_bins=2)
  out = batches(c, tok)
  assert len(out) == 2
  assert_batch(out[0], dict(
    tokens=[[2, 10, 11, 12, 1, 2, 30, 1], [2, 20, 21, 22, 23, 24, 25, 1]],
    positions=[[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]],
    segment_ids=[[1, 1, 1, 1, 1, 2, 2, 2], [1] * 8],
    targets=[[10, 11, 12, 1, 0, 30, 1, 0], [20, 21, 22, 23, 24, 25, 1, 0]],
    loss_weights=[[1, 1, 1, 1, 0, 1, 1, 0], [1] * 7 + [0]]))
  assert_batch(out[1], dict(
    tokens=[[2, 40, 41, 1, 0, 0, 0, 0], [2, 50, 51, 52, 1, 0, 0, 0]],
    positions=[[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]],
    segment_ids=[[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]],
    targets=[[40, 41, 1, 0, 0, 0, 0, 0], [50, 51, 52, 1, 0, 0, 0, 0]],
    loss_weights=[[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]))


@pytest.mark.parametrize("packing", ["first_fit", "none"])
def test_long_documents_split_into_rows(tok, packing):
  # BOS 10..14 EOS is 7 tokens: rows of 4 hold it as two segments, positions from 0.
  out = batches(config(docs([10, 11, 12, 13, 14]), seq_len=4, batch_size=2, packing=packing), tok)
  assert_batch(out[0], dict(
    tokens=[[2, 10, 11, 12], [13, 14, 1, 0]],
    positions=[[0, 1, 2, 3], [0, 1, 2, 0]],
    segment_ids=[[1, 1, 1, 1], [1, 1, 1, 0]],
    targets=[[10, 11, 12, 0], [14, 1, 0, 0]],
    loss_weights=[[1, 1, 1, 0], [1, 1, 0, 0]]))


@pytest.mark.parametrize("packing", ["concat", "first_fit", "none"])
def test_long_documents_truncated(tok, packing):
  c = config(docs([10, 11, 12, 13, 14], [20]), seq_len=4, batch_size=2, packing=packing,
             truncate_long=True)
  rows = np.concatenate([b["tokens"] for b in batches(c, tok)])
  assert rows.tolist()[:2] == [[2, 10, 11, 12], [2, 20, 1, 0]]


def test_no_packing_puts_one_document_per_row(tok):
  out = batches(config(docs(A, C, D, E), seq_len=6, batch_size=2, packing="none"), tok)
  assert [r.tolist() for b in out for r in b["segment_ids"]] == [
    [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]


def test_packing_efficiency_on_the_shipped_corpus(tok):
  c = config([{"path": str(CORPUS)}], seq_len=128, batch_size=4)
  out = batches(c, tok)
  real = sum(int((b["segment_ids"] > 0).sum()) for b in out)
  assert real / sum(b["tokens"].size for b in out) >= 0.95


# --- formats ------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "model", "content": "Hello."},
        {"role": "user", "content": "What goes in bread?"},
        {"role": "model", "content": "Flour and water."}]


@pytest.mark.parametrize("chat_template", [True, False])  # Only prompts of other formats care.
def test_chat_loss_weights_token_by_token(tok, chat_template):
  eot, enc = tok.end_of_turn_id, tok.encode
  pieces = [  # (ids, is the token a training target)
    ([BOS], 0), (enc("<start_of_turn>user\nHi there<end_of_turn>\n"), 0),
    (enc("<start_of_turn>model\n"), 0), (enc("Hello."), 1), ([eot], 1), (enc("\n"), 0),
    (enc("<start_of_turn>user\nWhat goes in bread?<end_of_turn>\n"), 0),
    (enc("<start_of_turn>model\n"), 0), (enc("Flour and water."), 1), ([eot], 1),
    (enc("\n"), 0)]
  ids = [i for p, _ in pieces for i in p]
  is_target = [w for p, w in pieces for _ in p]
  assert ids == tok.encode_chat(CHAT, add_generation_prompt=False)  # The Gemma template.
  n, size = len(ids), 64
  c = config([{"records": [{"messages": CHAT}]}], format="chat", seq_len=size, batch_size=1,
             packing="none", chat_template=chat_template)
  (batch,) = batches(c, tok)
  pad = [0] * (size - n)
  assert_batch(batch, dict(
    tokens=[ids + pad], positions=[list(range(n)) + pad], segment_ids=[[1] * n + pad],
    targets=[ids[1:] + [0] + pad], loss_weights=[is_target[1:] + [0] + pad]))
  trained = batch["targets"][batch["loss_weights"] > 0]
  assert tok.decode(trained) == "Hello.<end_of_turn>Flour and water.<end_of_turn>"


def test_chat_merges_system_and_accepts_assistant(tok):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}]
  c = config([{"records": [{"conv": messages}], "fields": {"messages": "conv"}}],
             format="chat", seq_len=48, batch_size=1, packing="none")
  (batch,) = batches(c, tok)
  text = tok.decode(batch["tokens"][0][batch["segment_ids"][0] > 0])
  assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                  "<start_of_turn>model\nHello.<end_of_turn>\n")


def test_preference_pairs_share_rows_and_segments(tok):
  pairs = [{"q": "What is bread?", "good": "Flour.", "bad": "Rock."},
           {"q": "Tide?", "good": "The moon.", "bad": "Wind."}]
  fields = {"prompt": "q", "chosen": "good", "rejected": "bad"}
  c = config([{"records": pairs, "fields": fields}], format="preference", seq_len=64,
             batch_size=1, packing="first_fit")
  (batch,) = batches(c, tok)
  assert set(batch) == {f"{p}_{k}" for p in ("chosen", "rejected") for k in KEYS}
  for side, key in (("chosen", "good"), ("rejected", "bad")):
    tokens, segments = batch[f"{side}_tokens"][0], batch[f"{side}_segment_ids"][0]
    targets, weights = batch[f"{side}_targets"][0], batch[f"{side}_loss_weights"][0]
    for k, pair in enumerate(pairs, 1):  # Segment k of both sides is pair k.
      prompt = tok.encode_chat([{"role": "user", "content": pair["q"]}])
      response = tok.encode(pair[key]) + [tok.end_of_turn_id]
      assert tokens[segments == k].tolist() == prompt + response
      assert targets[segments == k][weights[segments == k] > 0].tolist() == response
      assert weights[segments == k].sum() == len(response)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_rl_prompts_padding_and_reference_fields(tok, padding):
  records = [{"prompt": "What is 2 + 2?", "answer": "4", "id": 7},
             {"prompt": [{"role": "user", "content": "Spell tide."}], "answer": "t-i-d-e"}]
  c = config([{"records": records}], format="rl", seq_len=24, batch_size=2, rl_padding=padding)
  (batch,) = batches(c, tok)
  assert batch["reference"] == [{"answer": "4", "id": 7}, {"answer": "t-i-d-e"}]
  for row, text in enumerate(["What is 2 + 2?", "Spell tide."]):
    ids = tok.encode_chat([{"role": "user", "content": text}])
    n, pad = len(ids), [0] * (24 - len(ids))
    assert batch["lengths"][row] == n
    assert batch["tokens"][row].tolist() == (pad + ids if padding == "left" else ids + pad)
    assert batch["segment_ids"][row].tolist() == (
      pad + [1] * n if padding == "left" else [1] * n + pad)
    assert batch["positions"][row].tolist() == (
      pad + list(range(n)) if padding == "left" else list(range(n)) + pad)


def test_plain_prompts_without_chat_template(tok):
  c = config([{"records": [{"prompt": "Once upon", "chosen": "a time", "rejected": "no"}]}],
             format="preference", seq_len=32, batch_size=1, packing="none", chat_template=False)
  (batch,) = batches(c, tok)
  chosen = batch["chosen_tokens"][0][batch["chosen_segment_ids"][0] > 0].tolist()
  assert chosen == tok.encode("Once upon", add_bos=True) + tok.encode("a time") + [EOS]


# --- determinism and per-process shards ----------------------------------------------------


def numbered_docs(n):
  return docs(*[[100 + k] for k in range(n)])


def doc_ids(out):
  """Document numbers in the order the batches hold them (rows hold [BOS, 100 + k, EOS])."""
  return [int(t) - 100 for b in out for t in b["tokens"].ravel() if t >= 100]


def test_same_seed_same_batches_and_epochs_reshuffled(tok):
  c = config(numbered_docs(24), seq_len=4, batch_size=4, packing="none", shuffle=True,
             num_epochs=2, seed=3)
  first, again = doc_ids(batches(c, tok)), doc_ids(batches(c, tok))
  assert first == again
  assert sorted(first[:24]) == sorted(first[24:]) == list(range(24))
  assert first[:24] != first[24:] and first[:24] != list(range(24))
  c.seed = 4
  assert doc_ids(batches(c, tok)) != first


def test_processes_read_disjoint_shares(tok):
  c = config(numbered_docs(41), seq_len=4, batch_size=4, packing="none", shuffle=True)
  shares = [doc_ids(batches(c, tok, process_index=i, process_count=2)) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 20  # 41 // 2 each; the odd record is dropped.
  assert not set(shares[0]) & set(shares[1])
  assert all(b["tokens"].shape == (2, 4) for b in batches(c, tok, process_index=1,
                                                            process_count=2))


def test_weighted_mixing(tok):
  sources = [{"records": [{"tokens": [100]}] * 8, "weight": 1},
             {"records": [{"tokens": [200]}] * 8, "weight": 3}]
  c = config(sources, seq_len=4, batch_size=4, packing="none", num_epochs=None)
  ids = [int(t) for b in batches(c, tok, 10) for t in b["tokens"][:, 1]]
  assert ids.count(200) == 30 and ids.count(100) == 10


# --- checkpointed state -------------------------------------------------------------------


def chat_source():
  return [{"path": str(DATA / "chat_sft.jsonl")}]


def with_bad_records():
  records = [{"tokens": [100 + k]} if k % 5 else {"tokens": []} for k in range(30)]
  return [{"records": records}]


@pytest.mark.parametrize("sources, overrides", [
  ([{"path": str(CORPUS)}], dict(packing="concat")),
  ([{"path": str(CORPUS)}], dict(packing="first_fit", packing_bins=4)),
  (chat_source(), dict(format="chat", packing="first_fit", packing_bins=3)),
  (with_bad_records(), dict(packing="none", skip_bad_records=True)),
])
def test_restore_mid_epoch_equals_uninterrupted(tok, sources, overrides):
  c = config(sources, seq_len=32, batch_size=2, shuffle=True, num_epochs=None, **overrides)
  it = iter(make_dataset(c, tok))
  for _ in range(300):  # Past the first group of records the pipeline formats at once.
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(7)]  # Crosses an epoch of the small sets.
  restored = iter(make_dataset(c, tok))
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(7)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


# --- global arrays ------------------------------------------------------------------------


def mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("shape, names", [((2, 4), ("data", "fsdp")),
                                          ((2, 2, 2), ("data", "fsdp", "tensor"))])
def test_global_batches_are_sharded_over_data_and_fsdp(tok, shape, names):
  c = config([{"path": str(CORPUS)}], seq_len=16, batch_size=8, num_epochs=None)
  it = make_iterator(c, tok, mesh(shape, names))
  local = iter(make_dataset(c, tok))
  for _ in range(2):
    batch, want = next(it), next(local)
    assert set(batch) == set(KEYS)
    for key in KEYS:
      assert isinstance(batch[key], jax.Array) and batch[key].shape == (8, 16)
      assert batch[key].sharding.spec == PartitionSpec(("data", "fsdp"))
      np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
  state = it.get_state()
  after = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(it)["tokens"]), np.asarray(after["tokens"]))


def test_skipped_records_counted_and_restored(tok):
  c = config(with_bad_records(), seq_len=4, batch_size=8, packing="none", num_epochs=None,
             skip_bad_records=True)
  it = make_iterator(c, tok, mesh((2, 4), ("data", "fsdp")))
  # Records 0, 5, 10, ... are bad. A batch is the next 8 good records, and the packer reads
  # on to the one after them, which does not fit: batch 1 reads records 0-11.
  next(it)
  assert it.skipped_records == 3
  state = it.get_state()
  counts = []
  for _ in range(3):
    next(it)
    counts.append(it.skipped_records)
  assert counts[-1] == 9  # Records 0-41 read: 32 good ones in 4 batches, and one more.
  it.set_state(state)
  restored = []
  for _ in range(3):
    next(it)
    restored.append(it.skipped_records)
  assert restored == counts


def test_rl_batches_keep_references_on_the_host(tok):
  records = [{"prompt": f"What is {k} + 1?", "answer": str(k + 1)} for k in range(8)]
  c = config([{"records": records}], format="rl", seq_len=24, batch_size=8)
  batch = next(make_iterator(c, tok, mesh((2, 4), ("data", "fsdp"))))
  assert [r["answer"] for r in batch["reference"]] == [str(k + 1) for k in range(8)]
  assert batch["lengths"].shape == (8,) and isinstance(batch["lengths"], jax.Array)


# --- grain worker processes ---------------------------------------------------------------


def test_worker_processes_give_the_same_batches_and_state(tok):
  c = config(chat_source(), format="chat", seq_len=64, batch_size=4, packing="first_fit",
             packing_bins=4, shuffle=True, num_epochs=None)
  want = batches(c, tok, 6)
  c.worker_count = 2
  it = iter(make_dataset(c, tok))
  got = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  got += [next(it) for _ in range(3)]
  it.close()
  restored = iter(make_dataset(c, tok))
  restored.set_state(state)
  got_restored = [next(restored) for _ in range(3)]
  restored.close()
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g["tokens"], w["tokens"])
  for w, g in zip(want[3:], got_restored):
    np.testing.assert_array_equal(g["loss_weights"], w["loss_weights"])


# --- weighted mixtures --------------------------------------------------------------------


def mixture(weights=(5, 3, 2), sizes=(10, 7, 4)):
  """Sources whose every document is [BOS, 100 * (k + 1), EOS] for source k."""
  return [{"records": [{"tokens": [100 * (k + 1)]}] * n, "weight": w, "name": f"s{k}"}
          for k, (w, n) in enumerate(zip(weights, sizes))]


def test_mixture_follows_the_weights_and_counts_tokens_and_epochs(tok):
  c = config(mixture(), seq_len=4, batch_size=8, packing="none", shuffle=True,
             num_epochs=None)
  it = make_iterator(c, tok, mesh((2, 4), ("data", "fsdp")))
  ids = np.concatenate([np.asarray(next(it)["tokens"])[:, 1] for _ in range(100)])
  n, metrics = ids.size, it.source_metrics()
  for k, (p, size) in enumerate(zip((0.5, 0.3, 0.2), (10, 7, 4))):
    count = int((ids == 100 * (k + 1)).sum())
    assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (k, count)  # Binomial bound.
    # The packer reads ahead at most a row's worth of records past the last batch.
    assert 3 * count <= metrics[f"data_tokens/s{k}"] <= 3 * (count + 8)
    assert count / size <= metrics[f"data_epochs/s{k}"] <= (count + 8) / size


def test_resume_mid_mixture_equals_a_straight_run(tok):
  c = config(mixture() + [{"path": str(CORPUS), "weight": 4}], seq_len=16, batch_size=8,
             packing="concat", shuffle=True, num_epochs=None)
  it = make_iterator(c, tok, mesh((2, 4), ("data", "fsdp")))
  for _ in range(13):
    next(it)
  state, counts = json.loads(json.dumps(it.get_state())), it.source_metrics()
  straight = [np.asarray(next(it)["tokens"]) for _ in range(9)]
  resumed = make_iterator(c, tok, mesh((2, 4), ("data", "fsdp")))
  resumed.set_state(state)
  assert resumed.source_metrics() == counts and counts["data_tokens/s0"] > 0
  for want in straight:
    np.testing.assert_array_equal(np.asarray(next(resumed)["tokens"]), want)
  assert resumed.source_metrics() == it.source_metrics()
