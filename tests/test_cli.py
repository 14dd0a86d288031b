"""The info and demo commands."""

import json

import jax.numpy as jnp
import numpy as np

from gemma_jax import demo, info
from model_utils import random_model, random_tokens


def test_info_prints_counts(capsys):
  assert info.main(["--model", "gemma3_270m"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["params"]["total"] == 268_098_176
  assert out["layers_by_kind"] == {"local": 15, "global": 3}
  assert out["config"]["sliding_window"] == 512


def test_demo_greedy_matches_naive_recompute():
  """The fixed buffer with padding slots decodes exactly what growing the sequence does."""
  cfg, model = random_model("tiny_gemma2")
  prompt = random_tokens(cfg, (5,)).tolist()
  naive = list(prompt)
  for _ in range(6):
    naive.append(int(np.argmax(np.asarray(model(jnp.asarray([naive])))[0, -1])))
  assert demo.greedy_extend(model, prompt, 6) == naive[len(prompt):]


def test_demo_runs(capsys):
  assert demo.main(["--max_new_tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert "finite=True" in out and "<start_of_turn>user" in out
