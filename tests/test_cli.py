"""The info and demo commands."""

import json

from gemma_jax import demo, info


def test_info_prints_counts(capsys):
  assert info.main(["--model", "gemma3_270m"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["params"]["total"] == 268_098_176
  assert out["layers_by_kind"] == {"local": 15, "global": 3}
  assert out["config"]["sliding_window"] == 512


def test_demo_runs(capsys):
  assert demo.main(["--max_new_tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert "finite=True" in out and "<start_of_turn>user" in out
  assert "greedy sample of " in out and "KV-cache sampler" in out
