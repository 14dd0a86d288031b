"""gemma_jax.eval on a tiny model: packed scores against one forward per pair, the harness's
text conventions (few-shot prompts, token boundaries, windows), each task kind's metrics,
the command line and its one-line errors on bad task files."""

import functools
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from gemma_jax import sharding
from gemma_jax.checkpoint import save_model_dir
from gemma_jax.config import get_config
from gemma_jax.eval import Evaluator, load_task, requests, shipped
from gemma_jax.eval.__main__ import main as eval_main
from gemma_jax.eval.evaluate import extract
from gemma_jax.eval.scorer import Scorer, pack
from gemma_jax.eval.tasks import SHIPPED_DIR, Task
from gemma_jax.model import init_model
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model directory, model, tokenizer): a float32 tiny Gemma 3 with a 512-piece tokenizer."""
  tmp = tmp_path_factory.mktemp("eval")
  spm = train_sentencepiece([CORPUS], tmp / "spm", 512)
  cfg = get_config("tiny_gemma3", dtype="float32")  # scanned: many shapes compile faster
  model = init_model(cfg, seed=3)
  save_model_dir(tmp / "model", cfg, model, tokenizer_model=spm)
  return tmp / "model", model, Tokenizer(spm)


WIDTH = 128  # every reference forward runs one compiled [1, WIDTH] shape, right-padded


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, segment_ids):
  return nnx.merge(graphdef, state)(tokens, None, segment_ids)


def reference_score(model, context, continuation):
  """float64 log p(continuation | context) and greedy, from one unpacked forward."""
  seq = np.array(context + continuation)
  tokens, segments = np.zeros((1, WIDTH), np.int32), np.zeros((1, WIDTH), np.int32)
  tokens[0, :len(seq) - 1], segments[0, :len(seq) - 1] = seq[:-1], 1
  logits = np.float64(_logits(*nnx.split(model), tokens, segments)[0, :len(seq) - 1])
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  rows = np.arange(len(context) - 1, len(seq) - 1)  # the positions predicting the continuation
  greedy = (logits[rows].argmax(-1) == seq[rows + 1]).all()
  return logp[rows, seq[rows + 1]].sum(), bool(greedy)


def random_pairs(seed, n, vocab):
  rng = np.random.default_rng(seed)
  return [([2] + rng.integers(4, vocab, rng.integers(0, 40)).tolist(),
           rng.integers(4, vocab, rng.integers(1, 12)).tolist()) for _ in range(n)]


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_packed_scores_equal_one_forward_per_pair(tiny, mesh_shape):
  _, model, _ = tiny
  pairs = random_pairs(0, 13, model.config.vocab_size)
  ctx = pairs[0][0]
  pairs.append((ctx, [int(np.argmax(_logits(*nnx.split(model), np.array([ctx]), None)[0, -1]))]))
  mesh = None if mesh_shape is None else sharding.make_mesh(dict(zip(("data", "fsdp",
                                                                      "tensor"), mesh_shape)))
  got = Scorer(model, mesh, max_length=64, batch_rows=2).score(pairs)
  for (ctx, cont), (logp, greedy) in zip(pairs, got):
    want = reference_score(model, ctx, cont)
    assert logp == pytest.approx(want[0], rel=1e-5, abs=1e-4)
    assert greedy == want[1]
  assert got[-1][1]  # the argmax token is greedy by construction


def test_scores_truncate_the_context_on_the_left_as_the_harness(tiny):
  _, model, _ = tiny
  ctx, cont = random_pairs(1, 1, model.config.vocab_size)[0]
  ctx = ctx + ctx + ctx  # longer than max_length
  (logp, _), = Scorer(model, max_length=16).score([(ctx, cont)])
  seq = (ctx + cont)[-17:]
  want = reference_score(model, seq[:len(seq) - len(cont)], cont)[0]
  assert logp == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_pack_fills_rows_first_fit_longest_first():
  rows = pack([5, 9, 3, 7, 1], 10)
  assert rows == [[1, 4], [3, 2], [0]]
  assert all(sum([5, 9, 3, 7, 1][i] for i in r) <= 10 for r in rows)


def test_encode_pair_moves_trailing_spaces_and_splits_at_the_context(tok):
  ctx, cont = requests.encode_pair(tok, "Question: 2 plus 2?\nAnswer: ", "4")
  assert ctx == tok.encode("Question: 2 plus 2?\nAnswer:", add_bos=True)
  assert ctx + cont == tok.encode("Question: 2 plus 2?\nAnswer: 4", add_bos=True)
  assert tok.decode(cont) == " 4"
  # A choice that starts with a space: the boundary is after the context's own tokens, even
  # where the whole text tokenizes differently from context + choice apart.
  ctx2, cont2 = requests.encode_pair(tok, "The dough", " rises slowly")
  whole = tok.encode("The dough rises slowly", add_bos=True)
  assert ctx2 == tok.encode("The dough", add_bos=True) and cont2 == whole[len(ctx2):]
  assert requests.encode_pair(tok, "", "Bread") == ([tok.bos_id], tok.encode("Bread"))


def test_windows_equal_the_harness_rolling_windows_and_cover_once():
  utils = pytest.importorskip("lm_eval.utils")
  for n in [1, 3, 8, 9, 17, 40]:
    tokens = list(range(10, 10 + n))
    for length in [1, 2, 4, 8]:
      want = [tuple(map(list, utils.make_disjoint_window(w))) for w in
              utils.get_rolling_token_windows(tokens, 2, length, 1)]
      assert [tuple(map(list, w)) for w in requests.windows(tokens, 2, length)] == want
      for overlap in range(length):
        got = list(requests.windows(tokens, 2, length, overlap))
        assert sum((scored for _, scored in got), []) == tokens
        assert all(len(c) + len(s) - 1 <= length for c, s in got)
        assert all(len(c) >= min(overlap, i) + 1 for i, (c, _) in enumerate(
            got[1:], 1) if len(c))


def test_fewshot_prompts_are_seeded_and_drawn_from_the_fewshot_split():
  docs = tuple({"context": f"q{i}", "choices": ["a", "b"], "label": 0} for i in range(3))
  shots = tuple({"context": f"s{i}", "choices": ["x", "y"], "label": 1} for i in range(5))
  task = Task("t", "multiple_choice", docs, shots, num_fewshot=2, description="D")
  got = requests.prompts(task)
  assert got == requests.prompts(task)
  assert all(p.startswith("D\n\n") and p.endswith(f"q{i}") for i, p in enumerate(got))
  assert all(p.count(" y\n\n") == 2 and "q" not in p[:-2] for p in got)


def test_perplexity_is_token_weighted_over_sliding_windows(tiny):
  _, model, tok = tiny
  texts = [" ".join(CORPUS.read_text().split()[:90]), "Salt slows the yeast."]
  task = Task("p", "perplexity", tuple({"text": t} for t in texts), context_length=32,
              context_overlap=8)
  got = Evaluator(model, tok, progress=False).run(task)
  logp = tokens = 0
  for t in texts:
    for ctx, scored in requests.windows(tok.encode(t), tok.bos_id, 32, 8):
      logp += reference_score(model, ctx, scored)[0]
      tokens += len(scored)
  assert tokens == sum(len(tok.encode(t)) for t in texts) and tokens > 64
  assert got["token_perplexity"] == pytest.approx(math.exp(-logp / tokens), rel=1e-5)
  nbytes = sum(len(t.encode()) for t in texts)
  assert got["bits_per_byte"] == pytest.approx(-logp / nbytes / math.log(2), rel=1e-5)


def test_multiple_choice_acc_and_length_normalised_acc(tiny):
  _, model, tok = tiny
  task = load_task("word_completion")
  ev = Evaluator(model, tok, progress=False)
  lls = ev.choice_loglikelihoods(task)
  prompts = requests.prompts(task)
  ctx, cont = requests.encode_pair(tok, prompts[0], " " + task.docs[0]["choices"][1])
  assert lls[0][1] == pytest.approx(reference_score(model, ctx, cont)[0], rel=1e-5, abs=1e-4)
  got = ev.run(task)
  labels = [d["label"] for d in task.docs]
  lengths = [[len(c) for c in d["choices"]] for d in task.docs]
  assert got["acc"] == np.mean([np.argmax(ll) == y for ll, y in zip(lls, labels)])
  assert got["acc_norm"] == np.mean([np.argmax(np.array(ll) / n) == y
                                     for ll, n, y in zip(lls, lengths, labels)])


def test_generation_exact_match_on_the_sampler_completions(tiny):
  _, model, tok = tiny
  task = load_task("arithmetic_gen")
  docs = task.docs[:3] + ({"prompt": task.docs[0]["prompt"], "answer": "@"},)
  task = Task(task.name, task.kind, docs, task.fewshot_docs, task.num_fewshot, stop=("e",),
              max_new_tokens=6, answer_regex=r"(\w+)")
  ev = Evaluator(model, tok, progress=False)
  got = ev.completions(task)
  want = Sampler(model, tok).generate(
      [tok.encode(p, add_bos=True) for p in requests.prompts(task)],
      SamplingParams(max_new_tokens=6, stop=("e",)))
  assert got == [c.text for c in want] and not any("e" in g for g in got)
  hits = [extract(r"(\w+)", g) == d["answer"] for g, d in zip(got, docs)]
  assert ev.run(task)["exact_match"] == np.mean(hits)


def test_extract_takes_the_first_match_or_invalid():
  assert extract(r"#### (\-?[0-9\.\,]+)", "so #### 42\n#### 7") == "42"
  assert extract(r"(-?\d+)|(x)", " x then 3") == "x"
  assert extract(r"(\d+)", "none") == "[invalid]"
  assert extract("", "  19 \n") == "19"


def test_shipped_tasks_load_and_regenerate_byte_for_byte(tmp_path, monkeypatch):
  assert shipped() == ["arithmetic_gen", "arithmetic_mc", "prose_perplexity",
                       "word_completion"]
  kinds = {n: load_task(n).kind for n in shipped()}
  assert sorted(set(kinds.values())) == ["generation", "multiple_choice", "perplexity"]
  import importlib.util
  spec = importlib.util.spec_from_file_location("make_tasks", SHIPPED_DIR / "make_tasks.py")
  make = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make)
  monkeypatch.setattr(make, "HERE", tmp_path)
  assert make.main([]) == 0
  for path in sorted(SHIPPED_DIR.glob("*.json*")):
    assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_cli_prints_a_table_and_writes_json(tiny, tmp_path, capsys):
  path, model, tok = tiny
  out = tmp_path / "results.json"
  assert eval_main(["--checkpoint", str(path), "--task", "arithmetic_mc", "--task",
                    "prose_perplexity", "--limit", "3", "--max_length", "64",
                    "--output", str(out), "--no_progress"]) == 0
  printed = capsys.readouterr().out
  results = json.loads(out.read_text())["results"]
  assert "| arithmetic_mc | acc |" in printed and "| prose_perplexity | bits_per_byte |" in printed
  ev = Evaluator(model, tok, max_length=64, progress=False)
  assert results["arithmetic_mc"] == pytest.approx(ev.run(load_task("arithmetic_mc"), 3))
  assert results["prose_perplexity"]["examples"] == 3


def write_lines(path, lines):
  path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines)
                  + "\n")
  return path


GOOD = {"context": "Q", "choices": ["a", "b"], "label": 1}


@pytest.mark.parametrize("record,message", [
    ({"context": "Q", "choices": ["a"]}, "line 3: missing field 'label'"),
    ({**GOOD, "label": 2}, "line 3: field 'label' is 2, out of range for 2 choices"),
    ({**GOOD, "choices": []}, "line 3: field 'choices' must be a non-empty list"),
    ({**GOOD, "label": "1"}, "line 3: field 'label' must be an integer"),
    ("{not json", "line 3: not JSON"),
])
def test_bad_task_files_end_in_one_line_naming_file_line_and_field(tiny, tmp_path, capsys,
                                                                   record, message):
  data = write_lines(tmp_path / "bad.jsonl", [GOOD, "", record])  # blank lines still count
  assert eval_main(["--checkpoint", str(tiny[0]), "--task", str(data)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("gemma_jax.eval: error: ")
  assert f"{data}, {message}" in err


def test_bad_spec_and_unknown_task_are_one_line_errors(tiny, tmp_path, capsys):
  write_lines(tmp_path / "d.jsonl", [{"prompt": "p"}])
  spec = tmp_path / "t.json"
  spec.write_text(json.dumps({"kind": "generation", "data": "d.jsonl"}))
  assert eval_main(["--checkpoint", str(tiny[0]), "--task", str(spec)]) == 1
  assert f"{tmp_path / 'd.jsonl'}, line 1: missing field 'answer'" in capsys.readouterr().err
  assert eval_main(["--checkpoint", str(tiny[0]), "--task", "no_such_task"]) == 1
  assert "shipped: arithmetic_gen" in capsys.readouterr().err
