"""gemma_jax.data sources: files, ArrayRecord, bad records, start-up checks, shipped data."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from gemma_jax.data import BadRecordError, default_config, make_dataset, make_iterator
from gemma_jax.data.to_array_record import convert
from gemma_jax.tokenizer import train_sentencepiece

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "tokenizer_corpus.txt"
ROOT = Path(__file__).parent.parent


def config(sources, **overrides):
  c = default_config()
  c.sources = sources
  c.shuffle, c.num_epochs, c.seq_len, c.batch_size, c.packing = False, 1, 64, 1, "none"
  for key, value in overrides.items():
    c[key] = value
  return c


def rows(c, tok, n=None):
  """Every row's real tokens, decoded (control tokens dropped)."""
  it = iter(make_dataset(c, tok))
  out = list(it) if n is None else [next(it) for _ in range(n)]
  return [tok.decode(r[s > 0], skip_control=True)
          for b in out for r, s in zip(b["tokens"], b["segment_ids"])]


def write_lines(path: Path, lines) -> Path:
  path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
  return path


# --- sources ------------------------------------------------------------------------------


def test_text_files_split_into_paragraphs(tmp_path, tok):
  path = tmp_path / "a.txt"
  path.write_text("first line\nstill first\n\n  \n\nsecond\r\n\r\nthird\n")
  assert rows(config([{"path": str(path)}]), tok) == ["first line\nstill first", "second\r",
                                                     "third"]


def test_jsonl_with_field_names_globs_and_blank_lines(tmp_path, tok):
  write_lines(tmp_path / "a.jsonl", ['{"body": "one", "id": 1}', "", '{"body": "two"}'])
  write_lines(tmp_path / "b.jsonl", ["   ", '{"body": "three"}'])
  c = config([{"path": str(tmp_path / "*.jsonl"), "fields": {"text": "body"}}])
  assert rows(c, tok) == ["one", "two", "three"]


def test_array_record_matches_the_files_it_was_made_from(tmp_path, tok):
  assert convert([str(CORPUS)], str(tmp_path / "tokenizer_corpus.array_record")) == 43
  jsonl = write_lines(tmp_path / "a.jsonl", ['{"body": "one"}', '{"body": "two"}'])
  assert convert([str(jsonl)], str(tmp_path / "a.array_record")) == 2
  for made_from, fields in ((CORPUS, {}), (jsonl, {"text": "body"})):
    array_record = tmp_path / f"{made_from.stem}.array_record"
    kw = dict(shuffle=True, num_epochs=2, batch_size=2)
    want = rows(config([{"path": str(made_from), "fields": fields}], **kw), tok)
    got = rows(config([{"path": str(array_record), "fields": fields}], **kw), tok)
    assert got == want and len(want) > 1


def test_converter_cli_reports_bad_lines(tmp_path):
  bad = write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', '{"text": '])
  out = tmp_path / "bad.array_record"
  result = subprocess.run([sys.executable, "-m", "gemma_jax.data.to_array_record", str(bad),
                           "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 1
  assert f"{bad}:2: malformed JSON" in result.stderr
  assert not out.exists()


def test_memory_records_may_be_strings(tok):
  assert rows(config([{"records": ["plain text", {"text": "a dict"}]}]), tok) == [
    "plain text", "a dict"]


# --- bad records --------------------------------------------------------------------------

GOOD = '{"text": "good"}'
BAD_RECORDS = [  # format, bad line, what the error says
  ("pretrain", '{"text": "unterminated', "malformed JSON"),
  ("pretrain", '{"body": "wrong field"}', "missing field 'text'"),
  ("pretrain", '{"text": 42}', "field 'text' must be str, got int"),
  ("pretrain", '{"text": "  \\n "}', "empty document (field 'text')"),
  ("pretrain", '{"tokens": []}', "empty document (field 'tokens')"),
  ("pretrain", '{"tokens": [5, 1000]}', "token id 1000 in field 'tokens' is out of range"),
  ("pretrain", '{"tokens": [5, -1]}', "token id -1 in field 'tokens' is out of range"),
  ("pretrain", '{"tokens": [5, "x"]}', "field 'tokens' must be a list of ints"),
  ("pretrain", '["not", "an", "object"]', "expected a JSON object with field 'text', got list"),
  ("pretrain", b'{"text": "\xff"}', "not valid UTF-8"),
  ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "chat has no model turn"),
  ("chat", '{"messages": [{"role": "robot", "content": "hi"}]}',
   "field 'messages': message 0: unknown role 'robot'"),
  ("chat", '{"messages": "hi"}', "field 'messages' must be list, got str"),
  ("preference", '{"prompt": "q", "chosen": "a"}', "missing field 'rejected'"),
  ("preference", '{"prompt": "q", "chosen": "a", "rejected": ""}',
   "empty response (field 'rejected')"),
  ("rl", '{"prompt": ""}', "empty prompt (field 'prompt')"),
  ("rl", '{"prompt": "' + "word " * 80 + '"}', "more than seq_len=64"),
]
GOOD_BY_FORMAT = {
  "pretrain": GOOD,
  "chat": '{"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "good"}]}',
  "preference": '{"prompt": "q", "chosen": "good", "rejected": "bad"}',
  "rl": '{"prompt": "good"}',
}


def bad_file(tmp_path, fmt, bad):
  good = GOOD_BY_FORMAT[fmt]
  return write_lines(tmp_path / "data.jsonl", [good, good, "", bad, good])  # bad on line 4


@pytest.mark.parametrize("fmt, bad, reason", BAD_RECORDS)
def test_bad_record_error_names_file_and_line(tmp_path, tok, fmt, bad, reason):
  path = bad_file(tmp_path, fmt, bad)
  with pytest.raises(BadRecordError, match="skip_bad_records") as e:
    list(make_dataset(config([{"path": str(path)}], format=fmt), tok))
  assert str(e.value).startswith(f"{path}:4: ") and reason in str(e.value)


@pytest.mark.parametrize("fmt, bad, reason", BAD_RECORDS)
def test_bad_records_skipped_and_counted(tmp_path, tok, fmt, bad, reason):
  path = bad_file(tmp_path, fmt, bad)
  c = config([{"path": str(path)}], format=fmt, skip_bad_records=True, num_epochs=2)
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])
  it = make_iterator(c, tok, mesh)
  batches = list(it)
  assert len(batches) == 6 and it.skipped_records == 2  # 3 good and 1 bad per epoch.


def test_only_bad_records_is_an_error_not_a_hang(tmp_path, tok):
  path = write_lines(tmp_path / "bad.jsonl", ['{"text": ""}'] * 3)
  c = config([{"path": str(path)}], skip_bad_records=True, num_epochs=None)
  with pytest.raises(ValueError, match="the last 3 records were all bad"):
    next(iter(make_dataset(c, tok)))


def test_bad_text_file_paragraph_names_its_first_line(tmp_path, tok):
  path = tmp_path / "a.txt"
  path.write_bytes(b"fine\n\nalso fine\nmore\n\n\nbad \xff byte\nhere\n")
  with pytest.raises(BadRecordError, match=f"^{path}:7: not valid UTF-8"):
    rows(config([{"path": str(path)}]), tok)


# --- refused at start-up ------------------------------------------------------------------


@pytest.mark.parametrize("sources, overrides, message", [
  ([], {}, "config.data.sources is empty"),
  ([{"path": "/nonexistent/*.jsonl"}], {}, "no file matches"),
  ([{"records": []}], {}, r"sources\[0\] \(<memory>\) has no records"),
  ([{"path": str(CORPUS), "kind": "csv"}], {}, "kind must be one of"),
  ([{"path": str(CORPUS), "kind": "parquet"}], {}, "tokenizer_corpus.txt: not a Parquet file"),
  ([{"path": "x", "records": []}], {}, "exactly one of 'path' or 'records'"),
  ([{"records": ["a"], "weight": 0}], {}, "weight must be a positive number"),
  ([{"records": ["a"], "fields": {"txt": "body"}}], {}, r"fields has unknown keys \['txt'\]"),
  ([{"records": ["a"]}], {"format": "sft"}, "format must be one of"),
  ([{"records": ["a"]}], {"format": "preference", "packing": "concat"}, "split preference"),
  ([{"records": ["a"]}], {"seq_len": 1}, "seq_len must be an int >= 2"),
  ([{"records": ["a"]}], {"batch_size": 0}, "batch_size must be an int >= 1"),
])
def test_bad_config_refused(tok, sources, overrides, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    make_dataset(config(sources, **overrides), tok)


def test_empty_files_refused(tmp_path, tok):
  (tmp_path / "empty.jsonl").write_text("\n\n")
  (tmp_path / "blank.txt").write_text("   \n\n")
  for name in ("empty.jsonl", "blank.txt"):
    with pytest.raises(ValueError, match=f"{tmp_path / name}\\) has no records"):
      make_dataset(config([{"path": str(tmp_path / name)}]), tok)


def test_unknown_config_key_refused():
  c = default_config()
  with pytest.raises(AttributeError, match="batchsize"):
    c.batchsize = 8


def test_batch_size_must_divide_over_data_parallel_devices_and_processes(tok):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  c = config([{"records": ["a"] * 8}], batch_size=6)
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the data-parallel "
                                       r"size 4 \(data=2, fsdp=2\)"):
    make_iterator(c, tok, mesh)
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the process count 4"):
    make_dataset(c, tok, process_index=0, process_count=4)
  c.batch_size = 8
  with pytest.raises(ValueError, match="this process holds 8 of 8 batch rows"):
    make_iterator(c, tok, mesh, process_index=0, process_count=2)
  c.batch_size = 16
  with pytest.raises(ValueError, match="the dataset has 8 records, fewer than the 16 processes"):
    make_dataset(c, tok, process_index=0, process_count=16)


# --- the shipped data ---------------------------------------------------------------------


def test_generator_reproduces_the_shipped_sets(tmp_path):
  spec = importlib.util.spec_from_file_location("make_chat_sets", DATA / "make_chat_sets.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(tmp_path)
  for name in ("chat_sft.jsonl", "preferences.jsonl", "rl_prompts.jsonl"):
    assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.parametrize("name, fmt, count", [("chat_sft.jsonl", "chat", 240),
                                              ("preferences.jsonl", "preference", 160),
                                              ("rl_prompts.jsonl", "rl", 120)])
def test_shipped_sets_are_valid(tok, name, fmt, count):
  c = config([{"path": str(DATA / name)}], format=fmt, seq_len=128, batch_size=8)
  batches = list(make_dataset(c, tok))
  key = "segment_ids" if fmt != "preference" else "chosen_segment_ids"
  assert sum(int(b[key].max(axis=1).astype(bool).sum()) for b in batches) == count
  if fmt == "rl":
    assert all(json.dumps(r) for b in batches for r in b["reference"])
  else:
    weights = "loss_weights" if fmt == "chat" else "chosen_loss_weights"
    assert all((b[weights].sum(axis=1) > 0).all() for b in batches)


# --- Parquet ------------------------------------------------------------------------------


def write_parquet(path: Path, rows, row_group_size: int) -> Path:
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
  return path


def test_parquet_rows_read_by_row_groups_match_jsonl(tmp_path, tok):
  texts = [f"document number {k} says {'la ' * (k % 4)}hi" for k in range(23)]
  rows_ = [{"body": t, "url": f"u{k}"} for k, t in enumerate(texts)]
  write_parquet(tmp_path / "a.parquet", rows_[:17], row_group_size=5)  # Groups 5, 5, 5, 2.
  write_parquet(tmp_path / "b.parquet", rows_[17:], row_group_size=4)
  write_lines(tmp_path / "all.jsonl", [json.dumps(r) for r in rows_])
  fields = {"text": "body"}
  parquet = config([{"path": str(tmp_path / "*.parquet"), "fields": fields}], shuffle=True,
                   num_epochs=2, batch_size=2)
  jsonl = config([{"path": str(tmp_path / "all.jsonl"), "fields": fields}], shuffle=True,
                 num_epochs=2, batch_size=2)
  for process in range(2):  # Per-host shares, as for any other source.
    want = documents(jsonl, tok, process_index=process, process_count=2)
    assert documents(parquet, tok, process_index=process, process_count=2) == want
    assert len(want) == 23 and not set(want) - set(texts)
  assert documents(parquet, tok) == documents(jsonl, tok)


def documents(c, tok, **kwargs):
  """The decoded documents of this process's share."""
  return [tok.decode(r[s > 0], skip_control=True) for b in make_dataset(c, tok, **kwargs)
          for r, s in zip(b["tokens"], b["segment_ids"])]


def test_parquet_bad_row_names_file_and_row(tmp_path, tok):
  path = write_parquet(tmp_path / "a.parquet",
                       [{"text": "fine"}] * 7 + [{"text": None}] + [{"text": "ok"}] * 3, 4)
  with pytest.raises(BadRecordError, match=rf"^{path}\[row 7\]: field 'text' must be str"):
    rows(config([{"path": str(path)}]), tok)
  c = config([{"path": str(tmp_path / "a.parquet")}], skip_bad_records=True)
  assert len(rows(c, tok)) == 10


def test_parquet_chat_preference_and_rl_columns(tmp_path, tok):
  chat = [{"conv": [{"role": "user", "content": f"Hi {k}"},
                    {"role": "model", "content": f"Hello {k}."}]} for k in range(6)]
  pairs = [{"prompt": f"Say {k}", "chosen": f"{k}", "rejected": "no", "id": k}
           for k in range(6)]
  for fmt, records, fields in (("chat", chat, {"messages": "conv"}),
                               ("preference", pairs, {}), ("rl", pairs, {})):
    path = write_parquet(tmp_path / f"{fmt}.parquet", records, row_group_size=4)
    kw = dict(format=fmt, seq_len=32, batch_size=2, packing="none" if fmt != "rl" else "concat")
    want = list(make_dataset(config([{"records": records, "fields": fields}], **kw), tok))
    got = list(make_dataset(config([{"path": str(path), "fields": fields}], **kw), tok))
    assert len(got) == len(want) == 3
    for w, g in zip(want, got):
      assert set(w) == set(g)
      for key in w:
        if key == "reference":
          assert g[key] == w[key]
        else:
          np.testing.assert_array_equal(g[key], w[key], err_msg=f"{fmt} {key}")
  assert got[0]["reference"][0] == {"chosen": "0", "rejected": "no", "id": 0}  # rl: all columns


def test_parquet_without_the_configured_columns_refused(tmp_path, tok):
  path = write_parquet(tmp_path / "a.parquet", [{"body": "x"}], 1)
  with pytest.raises(ValueError, match=r"none of the columns .* is in the file; it has \['body'\]"):
    rows(config([{"path": str(path)}]), tok)


# --- long documents -----------------------------------------------------------------------


def piece_rows(c, tok):
  """Each row's token ids (one piece per row with packing none and a roomy seq_len)."""
  return [r[s > 0].tolist() for b in make_dataset(c, tok)
          for r, s in zip(b["tokens"], b["segment_ids"])]


@pytest.mark.parametrize("word", ["bread and water ", "é"])  # "é" * n: no whitespace to cut at
def test_long_paragraph_read_in_bounded_pieces(tmp_path, tok, word):
  long = (word * (3000 // len(word.encode())))[:1500].strip()
  path = tmp_path / "a.txt"
  path.write_text(f"short one\n\n{long}\n\nlast\n")
  c = config([{"path": str(path)}], seq_len=400, piece_bytes=256)
  out = piece_rows(c, tok)
  pieces = out[1:-1]
  assert len(pieces) >= len(long.encode()) // 256 + 1
  assert [tok.decode(out[k], skip_control=True) for k in (0, -1)] == ["short one", "last"]
  assert pieces[0][0] == tok.bos_id and pieces[-1][-1] == tok.eos_id
  inner = [i for p in pieces for i in (p[:1] + p[-1:])][1:-1]
  assert tok.bos_id not in inner and tok.eos_id not in inner  # Only at the document's ends.
  assert "".join(tok.decode(p, skip_control=True) for p in pieces) == long
  assert all(len(tok.decode(p, skip_control=True).encode()) <= 256 for p in pieces)
  c.piece_bytes = 1 << 16  # One piece: the whole paragraph, as before.
  whole = piece_rows(c, tok)[1:-1]  # Rows of seq_len: one piece, split by the packer.
  assert whole[0][0] == tok.bos_id and whole[-1][-1] == tok.eos_id
  assert tok.decode([i for r in whole for i in r], skip_control=True) == long


def test_bad_piece_names_its_byte_range(tmp_path, tok):
  path = tmp_path / "a.txt"
  path.write_bytes(b"ok\n\n" + b"word " * 100 + b"\xff" + b" word" * 100 + b"\n")
  with pytest.raises(BadRecordError, match=rf"^{path}:3 \(bytes \d+-\d+\): not valid UTF-8"):
    piece_rows(config([{"path": str(path)}], seq_len=400, piece_bytes=256), tok)


class SlowTokenizer:
  """The tokenizer, with every encode taking `delay` seconds."""

  def __init__(self, tok, delay):
    self._tok, self._delay = tok, delay

  def __getattr__(self, name):
    return getattr(self._tok, name)

  def encode(self, *args, **kwargs):
    import time
    time.sleep(self._delay)
    return self._tok.encode(*args, **kwargs)


def test_slow_first_batch_logs_progress(tok, caplog, monkeypatch):
  from gemma_jax.data import pipeline
  monkeypatch.setattr(pipeline, "_FIRST_BATCH_PATIENCE_S", 0.1)
  c = config([{"records": ["one", "two", "three", "four"]}], batch_size=8, num_epochs=None,
             seq_len=8, packing="concat")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  it = make_iterator(c, SlowTokenizer(tok, 0.01), mesh)  # A group of 64 records: > 0.6 s.
  with caplog.at_level("WARNING", logger=pipeline.__name__):
    next(it)
  lines = [r.getMessage() for r in caplog.records if "first batch" in r.getMessage()]
  assert lines and lines[0].startswith("data: waiting 0 s for the first batch")
  caplog.clear()
  with caplog.at_level("WARNING", logger=pipeline.__name__):
    next(it)
  assert not caplog.records  # Only the first batch is reported.


# --- pre-tokenized shards -----------------------------------------------------------------


def test_pretokenized_shards_give_the_batches_of_the_text(tmp_path, tok):
  from gemma_jax.data.pretokenize import pretokenize
  path = tmp_path / "corpus.txt"
  path.write_text(CORPUS.read_text() + "\n\n" + "a long one, " * 200 + "\n")
  model = tmp_path / "tokenizer.model"
  model.write_bytes(tok._sp.serialized_model_proto())
  manifest = pretokenize([str(path)], str(model), str(tmp_path / "shards"), shard_tokens=500)
  assert len(manifest["shards"]) > 2 and manifest["tokenizer"]["sha256"] == tok.fingerprint
  assert sum(s["documents"] for s in manifest["shards"]) == 44
  kw = dict(seq_len=64, batch_size=4, packing="concat", shuffle=True, num_epochs=2)
  want = list(make_dataset(config([{"path": str(path)}], **kw), tok))
  got = list(make_dataset(config([{"path": str(tmp_path / "shards")}], **kw), tok))
  assert len(got) == len(want) > 10
  for w, g in zip(want, got):
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_pretokenized_shards_refuse_another_tokenizer(tmp_path, tok):
  from gemma_jax.data.pretokenize import pretokenize
  from gemma_jax.tokenizer import Tokenizer
  model = tmp_path / "tokenizer.model"
  model.write_bytes(tok._sp.serialized_model_proto())
  pretokenize([str(CORPUS)], str(model), str(tmp_path / "shards"))
  other = Tokenizer(train_sentencepiece(CORPUS, tmp_path / "other", 600))
  with pytest.raises(ValueError, match=r"shards was tokenized with another tokenizer \(.*"
                                       r"tokenizer.model, vocab 1000"):
    make_dataset(config([{"path": str(tmp_path / "shards")}]), other)


def test_pretokenize_cli_progress_and_bad_record(tmp_path, tok, capsys):
  from gemma_jax.data.pretokenize import main
  model = tmp_path / "tokenizer.model"
  model.write_bytes(tok._sp.serialized_model_proto())
  good = write_lines(tmp_path / "a.jsonl", ['{"body": "one"}', '{"body": "two"}'])
  args = ["--tokenizer", str(model), "--field", "body", "--output"]
  assert main([str(good), *args, str(tmp_path / "ok")]) == 0
  out = capsys.readouterr()
  assert "[####################] 2/2 records" in out.err and "wrote 2 documents" in out.out
  bad = write_lines(tmp_path / "b.jsonl", ['{"body": "one"}', '{"text": "two"}'])
  result = subprocess.run([sys.executable, "-m", "gemma_jax.data.pretokenize", str(bad), *args,
                           str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == (
    f"error: {bad}:2: field 'body' must be a string, got NoneType")
  assert not (tmp_path / "bad" / "manifest.json").exists()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 22])
def test_text_index_read_in_chunks(tmp_path, tok, monkeypatch, chunk):
  from gemma_jax.data import sources
  monkeypatch.setattr(sources, "_INDEX_CHUNK", chunk)
  path = tmp_path / "a.txt"
  path.write_text("first line\nstill first\n\n  \n\nsecond\r\n\r\nthird\n\n\n x\n")
  assert rows(config([{"path": str(path)}]), tok) == ["first line\nstill first", "second\r",
                                                     "third", " x"]
  source = sources.TextFileSource([str(path)], "line")
  assert [source[i][0].rsplit(":", 1)[1] for i in range(len(source))] == ["1", "2", "6", "8",
                                                                          "11"]


class RecordingTokenizer(SlowTokenizer):
  """The tokenizer, noting the longest text it was asked to encode."""

  def __init__(self, tok):
    super().__init__(tok, 0)
    self.longest = 0

  def encode(self, text, *args, **kwargs):
    self.longest = max(self.longest, len(text))
    return self._tok.encode(text, *args, **kwargs)


def test_long_json_text_encoded_in_bounded_pieces(tmp_path, tok):
  text = " ".join(f"word{k}\n" if k % 7 == 0 else f"w{k}" for k in range(400))
  path = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": text})])
  recording = RecordingTokenizer(tok)
  c = config([{"path": str(path)}], seq_len=64, batch_size=2, packing="concat",
             piece_bytes=200)
  out = list(make_dataset(c, recording))
  assert 100 <= recording.longest <= 200
  ids = [int(t) for b in out for r, s in zip(b["tokens"], b["segment_ids"]) for t in r[s > 0]]
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids, skip_control=True) == text
