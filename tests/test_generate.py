"""The generate CLI on a saved model directory."""

import json
from pathlib import Path

import pytest

from gemma_jax import generate
from gemma_jax.checkpoint import save_model_dir
from gemma_jax.config import get_config
from gemma_jax.model import init_model
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("generate")
  spm = train_sentencepiece([CORPUS], tmp / "spm", 512)
  cfg = get_config("tiny_gemma1", dtype="float32")
  model = init_model(cfg, seed=4)
  save_model_dir(tmp / "model", cfg, model, tokenizer_model=spm)
  return tmp / "model", Sampler(model, Tokenizer(spm))


def run(capsys, *args):
  assert generate.main(list(args)) == 0
  return capsys.readouterr().out


def test_generate_batch_and_chat_match_the_sampler(model_dir, capsys):
  path, sampler = model_dir
  prompts = ["The baker kneads the dough", "Yeast feeds"]  # one compiled shape with chat's
  out = run(capsys, "--checkpoint", str(path), "--prompt", prompts[0], "--prompt", prompts[1],
            "--max_new_tokens", "6", "--temperature", "0.9", "--top_p", "0.8", "--seed", "3",
            "--json")
  rows = [json.loads(line) for line in out.splitlines()]
  want = sampler.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.8,
                                                  seed=3))
  assert [r["tokens"] for r in rows] == [c.tokens for c in want]
  assert [r["text"] for r in rows] == [c.text for c in want]
  assert rows[0]["prompt"] == prompts[0] and len(rows[0]["logprobs"]) == len(rows[0]["tokens"])

  chat = run(capsys, "--checkpoint", str(path), "--prompt", "Hi", "--chat",
             "--max_new_tokens", "5")
  prompt = sampler.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
  assert chat == sampler.generate([prompt], SamplingParams(max_new_tokens=5))[0].text + "\n"


@pytest.mark.parametrize("args,message", [
    (["--top_p", "1.5"], "SamplingParams.top_p must be"),
    (["--max_new_tokens", "0"], "SamplingParams.max_new_tokens must be"),
    (["--max_new_tokens", "300"], "exceed the context of 256"),
])
def test_generate_rejects_bad_arguments(model_dir, capsys, args, message):
  assert generate.main(["--checkpoint", str(model_dir[0]), "--prompt", "x", *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("gemma_jax.generate: error: ") and message in err and \
      err.count("\n") == 1, err


def test_generate_names_a_missing_directory(tmp_path, capsys):
  assert generate.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
  assert "config.json: not found" in capsys.readouterr().err
