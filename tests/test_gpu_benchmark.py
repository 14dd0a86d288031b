"""benchmarks/gpu.py --tiny on CPU: every row is present, xla rows measured, cudnn skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
  out = tmp_path / "gpu.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--tiny", "--json",
                         str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = json.loads(out.read_text())["rows"]
  train = {(r["seq_len"], r["attention_impl"]): r for r in rows if r["kind"] == "train"}
  assert {seq for seq, _ in train} == {128, 256}
  for seq in (128, 256):
    assert train[seq, "xla"]["mfu"] > 0, train[seq, "xla"]
    assert train[seq, "cudnn"]["skipped"] == "needs an NVIDIA GPU"
  decode = {r["batch"]: r for r in rows if r["kind"] == "decode"}
  assert set(decode) == {1, 64}
  for r in decode.values():
    assert r["decode_tokens_per_s"] > 0, r
    assert 0 < r["fraction_of_bound"] < 1.5, r
