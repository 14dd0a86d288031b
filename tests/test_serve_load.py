"""benchmarks/serve_load.py on the tiny model with a few clients: both engines' rows, every
response equal to the request run alone, and the warmed continuous engine compiling nothing
in its first pass (its weights come from a checkpoint, as a user's do)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 75 s on 2 cores
def test_serve_load_tiny(tmp_path):
  out = tmp_path / "serve_load.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--models", "tiny",
             "--clients", "4", "--requests", "8", "--max_passes", "2", "--json", str(out)]
  out.write_text(json.dumps({"runs": [{"date": "earlier"}]}))  # a run adds to the file
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  runs = json.loads(out.read_text())["runs"]
  assert len(runs) == 2 and runs[0] == {"date": "earlier"}
  rows = {r["engine"]: r for r in runs[-1]["rows"]}
  assert set(rows) == {"static", "continuous"}
  assert all(r["mismatches"] == 0 and r["tokens_per_s"] > 0 for r in rows.values()), rows
  assert (rows["continuous"]["passes"], rows["continuous"]["compilations"]) == (1, 0)
