"""The pod planner (launch.plan) and what it rests on: the FLOP counter of compiled programs
against gemma_jax.flops, the formula estimates, candidates, its choice and its errors."""

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from gemma_jax import flops
from launch import compile_step as aot
from launch import estimate, plan

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed: no TPU topology")


def small_model(policy: str, attention: str = "auto"):
  """A model whose FLOPs are nearly all weight matmuls (attention and logits are small)."""
  c = tiny.get_config()
  c.model.update(embed_dim=512, hidden_dim=2048, num_heads=8, head_dim=64, num_kv_heads=2,
                 num_layers=2, vocab_size=512, remat_policy=policy, attention_impl=attention)
  c.train.update(global_batch_size=8, seq_len=128)
  return c


@functools.cache
def small_report(policy: str, rows: int = 8, seq_len: int = 128, attention: str = "auto") -> dict:
  config = small_model(policy, attention)
  config.train.update(global_batch_size=rows, seq_len=seq_len)
  return aot.report(config, "v5e:2x2")


@needs_libtpu
def test_compiled_flops_match_the_model_count():
  """launch.hlo's FLOPs of the compiled step (every chip, loop bodies per trip) against
  gemma_jax.flops: within 5% without remat; full remat adds one forward of the layers."""
  chips = len(aot.topology_devices("v5e:2x2"))
  counted = {p: small_report(p)["hlo_flops_per_chip"] * chips for p in ("none", "full")}
  c = small_model("none")
  cfg = aot.model_config(c)
  tokens = c.train.global_batch_size * c.train.seq_len
  model = flops.train_flops_per_token(cfg, c.train.seq_len) * tokens
  layers_forward = (flops.forward_flops_per_token(cfg, c.train.seq_len)
                    - 2 * cfg.vocab_size * cfg.embed_dim) * tokens
  assert counted["none"] == pytest.approx(model, rel=0.05)
  assert counted["full"] - counted["none"] == pytest.approx(layers_forward, rel=0.05)


@pytest.mark.slow  # four compiles of 16K tokens: ~2 min
@needs_libtpu
@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_memory_formula_against_the_compiled_peaks(attention):
  """The formula prunes candidates: it must order the policies as the compiles do and stay
  within a factor of 1.6 of each compiled peak (8 rows of 512 tokens per chip, where
  activations outweigh the weights as they do on a pod), for either attention."""
  devices = aot.topology_devices("v5e:2x2")
  config = small_model("none", attention)
  layout = aot.build_layout(config, devices)
  shape = estimate.Shape(aot.model_config(config), 512, 8, 1, 1, 1024)
  formula = {p: estimate.memory_bytes(layout, shape, p) for p in ("none", "full")}
  compiled = {p: small_report(p, 32, 512, attention)["per_chip_bytes"]["peak"]
              for p in ("none", "full")}
  assert formula["none"] > formula["full"] and compiled["none"] > compiled["full"]
  for p in formula:
    assert 1 / 1.6 < formula[p] / compiled[p] < 1.6, (p, formula[p], compiled[p])


def test_formula_orders_policies_by_memory_and_recompute():
  cfg = aot.model_config(small_model("none"))
  shape = estimate.Shape(cfg, 2048, 2, 1, 1, 1024)
  kept = [estimate.layer_activation_bytes(shape, p) for p in
          ("none", "dots", "save_qkv_proj", "full")]
  assert kept == sorted(kept, reverse=True) and kept[-1] == 0
  assert estimate.layer_activation_bytes(shape, "offload_qkv_proj") == 0  # on the host
  redo = [estimate.recompute_fraction(cfg, 2048, p) for p in ("none", "save_qkv_proj", "full")]
  assert redo[0] == 0 < redo[1] < redo[2] < 1 / 3  # full: the layers' forward, once more


def test_formula_drops_the_logits_under_splash():
  """Splash keeps a float32 logsumexp per query and head where XLA keeps float32 logits over
  the keys (and their probabilities without remat); policies that keep no logits agree."""
  cfg = aot.model_config(small_model("none"))
  t, heads, keys = 2 * 2048, cfg.num_heads, estimate._attention_keys(cfg, 2048, "global")
  kept = {}
  for impl in ("xla", "splash"):
    shape = estimate.Shape(cfg.replace(attention_impl=impl), 2048, 2, 1, 1, 1024)
    kept[impl] = {p: estimate.layer_activation_bytes(shape, p) for p in
                  ("none", "dots", "save_qkv_proj")}
  assert kept["xla"]["dots"] - kept["splash"]["dots"] == t * heads * (keys - 1) * 4
  assert kept["xla"]["none"] - kept["splash"]["none"] == t * heads * (1.5 * keys - 1) * 4
  assert kept["xla"]["save_qkv_proj"] == kept["splash"]["save_qkv_proj"]
  # 'auto' resolves as it would on TPU: splash where the sequence tiles, else xla.
  for seq_len, impl in ((2048, "splash"), (1000, "xla")):
    auto = estimate.Shape(cfg.replace(attention_impl="auto"), seq_len, 2, 1, 1, 1024)
    same = estimate.Shape(cfg.replace(attention_impl=impl), seq_len, 2, 1, 1, 1024)
    assert estimate.layer_activation_bytes(auto, "dots") == \
        estimate.layer_activation_bytes(same, "dots")


def test_shortlist_keeps_the_smaller_of_equal_estimates():
  cands = [plan.Candidate("dots", 1, 8, 1, 16, 2048, 1, a) for a in ("xla", "splash")]
  est = [plan.Estimated(cands[0], 5e9, 1.0), plan.Estimated(cands[1], 3e9, 1.0)]
  assert [e.candidate.attention for e in plan.shortlist(est, 16e9)] == ["splash"]
  assert [e.candidate.attention for e in plan.shortlist(est, 4e9)] == ["splash"]
  est[0].seconds = 0.9  # faster wins over smaller
  assert [e.candidate.attention for e in plan.shortlist(est, 16e9)] == ["xla"]


def test_candidates_split_the_rows_evenly():
  cands = plan.candidates(rows=16, seq_len=128, chips=8)
  assert {c.remat for c in cands} == set(plan.PLANNED_POLICIES)
  assert {c.attention for c in cands} == {"xla", "splash"}
  assert {(c.data, c.fsdp, c.tensor) for c in cands} == {(1, 8, 1), (1, 4, 2), (1, 2, 4),
                                                          (2, 4, 1)}
  for c in cands:
    assert c.per_device_batch * c.data * c.fsdp * c.microbatches == 16
  assert {c.microbatches for c in cands if c.fsdp == 8} == {1, 2}
  # 2 rows cannot split over 8 or 4 batch shards: only the tensor-4 mesh takes them.
  assert {(c.data, c.fsdp, c.tensor) for c in plan.candidates(2, 128, 8)} == {(1, 2, 4)}


def test_nearest_topology_is_named():
  assert plan.nearest_topology("v5e:16x17") == "v5e:16x16"
  assert plan.nearest_topology("v5e:3x3") == "v5e:2x4"
  assert plan.nearest_topology("v4:2x2x3") in ("v4:2x2x2", "v4:2x2x4")


def _plan_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "launch.plan", *args], capture_output=True,
                        text=True, env=env, cwd=pathlib.Path(__file__).resolve().parent.parent)


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--topology=v5e:16x17"], "--topology=v5e:16x17: libtpu does not describe it"),
    (["--tokens_per_step=1000"], "--tokens_per_step=1000 is not a multiple of --seq_len=128"),
    pytest.param(["--config=configs/gemma2_27b.py", "--topology=v5e:2x2"],
                 "no layout of gemma2_27b fits 16 GiB per chip", marks=pytest.mark.slow),
])
def test_bad_input_is_one_line(args, message):
  out = _plan_cli("--config=configs/tiny.py", *args)
  lines = [line for line in out.stderr.splitlines() if line.startswith("launch.plan: error:")]
  assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  if "topology" in args[0]:
    assert "the nearest it does: --topology=v5e:16x16" in lines[0]


@pytest.mark.slow
@needs_libtpu
def test_the_nearest_token_target_that_splits(tmp_path):
  """One sequence cannot split over 4+ batch shards of 16 chips: the planner names the
  nearest target that does (4 sequences over fsdp 4 x tensor 4)."""
  out = _plan_cli("--config=configs/tiny.py", "--topology=v5e:4x4", "--tokens_per_step=128")
  assert out.returncode == 2
  assert "the nearest that fits (memory formula, an estimate): --tokens_per_step=512" in \
      out.stderr, out.stderr[-2000:]


@needs_libtpu
def test_plan_picks_the_fastest_fitting_compile_and_writes_it(tmp_path, monkeypatch):
  config = tiny.get_config()
  result = plan.plan(config, "configs/tiny.py", "v5e:2x2", [], seq_len=0, tokens=0,
                     compiles=1, workers=1, margin=0.9, cache=tmp_path / "cache", log=print)
  compiled = [c for c in result["compiled"] if "error" not in c["report"]]
  assert compiled and result["baseline"]["per_chip_gib"] >= 0
  fastest = min([result["baseline"], *(c["report"] for c in compiled)],
                key=lambda r: r["step_seconds_estimate"]["total"])
  assert result["winner"]["report"] == fastest
  assert result["winner"]["report"]["per_chip_bytes"]["peak"] <= 0.9 * result["hbm_bytes"]
  # tiny's attention_impl 'auto' is splash on TPU (128 tokens tile its blocks).
  assert "| baseline, the config's layout: none mesh 1x4x1 batch 2x1 splash |" in \
      result["table"]
  # The written config file loads and carries the winner's layout.
  out = tmp_path / "planned.py"
  out.write_text(plan.config_file(str(pathlib.Path("configs/tiny.py").resolve()), out,
                                  result["winner"]["overrides"], "v5e:2x2", "test"))
  spec = importlib.util.spec_from_file_location("planned", out)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  planned = module.get_config()
  for item in result["winner"]["overrides"]:
    key, _, value = item.removeprefix("--config.").partition("=")
    section, name = key.split(".")
    assert str(planned[section][name]) == value
  # A rerun reads the cached reports: no compile runs.
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
  again = plan.plan(config, "configs/tiny.py", "v5e:2x2", [], seq_len=0, tokens=0, compiles=1,
                    workers=1, margin=0.9, cache=tmp_path / "cache", log=print)
  assert json.dumps(again["winner"]) == json.dumps(result["winner"])
