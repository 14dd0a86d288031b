"""Pick the fastest train-step layout that fits a TPU pod, from the compiled programs.

  python -m launch.plan --config configs/gemma_7b.py --topology v5e:16x16 [--seq_len 8192]
      [--tokens_per_step 1048576] [--compiles 3] [--max_compiles 6] [--workers 1]
      [--margin 0.9] [--out configs/plan_gemma_7b_8192.py] [--config.x=y ...]

Candidates: every remat policy of `PLANNED_POLICIES` x mesh split (fsdp; fsdp x tensor 2 and
4; data 2 x fsdp) x per-device batch and microbatches making the token target x attention
implementation (xla, and splash where the sequence tiles its blocks). The formula estimates
of launch.estimate drop those that cannot fit and order the rest by estimated speed; the
fastest of each (policy, mesh) pair (of equal estimates the smaller: splash) is then
AOT-compiled through launch.aot (one worker process per compile, with the libtpu flags TPU
jobs run with), best first, until `--compiles` of them fit or `--max_compiles` have run,
and so is the config's own layout (the baseline). The table gives
each compile's per-chip peak, whether it fits, and launch.aot's estimate of step time from
the compiled program (HLO FLOPs at peak plus collective bytes over ICI). The winner is the
fastest whose peak stays under `--margin` of the chip's memory; it is printed as --config.
overrides and written as a config file.

Compile results are cached by command, libtpu flags and source digest under
$GEMMA_JAX_CACHE (default ~/.cache/gemma_jax/plan): jax's persistent compilation cache cannot
reload an executable compiled for a topology without a TPU client, so a rerun reads the
reports instead.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

from configs.base import ConfigError, model_config, validate_layout
from gemma_jax import exits
from gemma_jax.metrics import PEAK_FLOPS
from gemma_jax.sharding import mesh_shape
from launch import estimate, libtpu_flags
from launch.compile_step import (
  HBM_BYTES,
  ICI_BYTES_PER_S,
  build_layout,
  topology_devices,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLANNED_POLICIES = ("none", "dots", "save_qkv_proj", "offload_qkv_proj", "full")
ATTENTION_IMPLS = ("xla", "splash")
# Topologies libtpu describes, by generation: the nearest is named for an unknown one.
KNOWN_TOPOLOGIES = {
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16", "TPU topology, e.g. v5e:16x16")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "tokens per sequence (0: the config's)")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 0, "tokens per step (0: the config's)")
_COMPILES = flags.DEFINE_integer("compiles", 3, "compile candidates until this many fit")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 6, "... or this many are compiled")
_WORKERS = flags.DEFINE_integer("workers", 1, "compiles run at once (each a process)")
_MARGIN = flags.DEFINE_float("margin", 0.9, "a layout fits when its peak <= margin x HBM")
_OUT = flags.DEFINE_string("out", "", "the winner's config file "
                           "(default configs/plan_<config>_<seq_len>.py)")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "show an error's full stack, not one line")


@dataclasses.dataclass(frozen=True)
class Candidate:
  remat: str
  data: int
  fsdp: int
  tensor: int
  rows: int  # sequences per step
  seq_len: int
  microbatches: int
  attention: str = "xla"

  @property
  def per_device_batch(self) -> int:
    return self.rows // (self.data * self.fsdp * self.microbatches)

  def _batch(self) -> str:
    per_device = self.rows / (self.data * self.fsdp * self.microbatches)
    return f"{per_device:g}x{self.microbatches}"

  def overrides(self) -> list[str]:
    return [f"--config.model.remat_policy={self.remat}", f"--config.mesh.data={self.data}",
            f"--config.mesh.fsdp={self.fsdp}", f"--config.mesh.tensor={self.tensor}",
            f"--config.train.global_batch_size={self.rows}",
            f"--config.train.seq_len={self.seq_len}",
            f"--config.train.microbatches={self.microbatches}",
            f"--config.model.attention_impl={self.attention}"]

  def label(self) -> str:
    return (f"{self.remat} mesh {self.data}x{self.fsdp}x{self.tensor} "
            f"batch {self._batch()} {self.attention}")

  def apply(self, config):
    c = copy.deepcopy(config)
    c.model.remat_policy = self.remat
    c.model.attention_impl = self.attention
    c.mesh.update(data=self.data, fsdp=self.fsdp, tensor=self.tensor)
    c.train.update(global_batch_size=self.rows, seq_len=self.seq_len,
                   microbatches=self.microbatches)
    return c


def as_candidate(config, chips: int, rows: int, seq_len: int) -> Candidate:
  """The config's own layout at the planned token target, as a candidate (so its compile is
  shared with the candidate that is the same; 'auto' attention as it resolves on TPU)."""
  data, fsdp, tensor = mesh_shape(config.mesh, chips, "config.mesh")
  cfg = model_config(config)
  attention = estimate.tpu_attention(cfg, seq_len) or cfg.attention_impl  # compile says why
  return Candidate(cfg.remat_policy, data, fsdp, tensor, rows, seq_len,
                   config.train.microbatches, attention)


def mesh_splits(chips: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor): pure fsdp, fsdp x tensor 2 and 4, data 2 x fsdp."""
  splits = [(1, chips // t, t) for t in (1, 2, 4) if chips % t == 0 and chips // t > 0]
  if chips % 2 == 0 and chips > 2:
    splits.append((2, chips // 2, 1))
  return splits


def candidates(rows: int, seq_len: int, chips: int) -> list[Candidate]:
  """Every policy x mesh x (per-device batch, microbatches) that splits `rows` evenly."""
  out = []
  for data, fsdp, tensor in mesh_splits(chips):
    shards = data * fsdp
    if rows % shards:
      continue
    per_shard = rows // shards
    for micro in (m for m in range(1, per_shard + 1) if per_shard % m == 0):
      out += [Candidate(p, data, fsdp, tensor, rows, seq_len, micro, a)
              for p in PLANNED_POLICIES for a in ATTENTION_IMPLS]
  return out


@dataclasses.dataclass
class Estimated:
  candidate: Candidate
  memory: float  # bytes per chip (formula)
  seconds: float  # per step (formula)


def estimate_all(config, cands: list[Candidate], devices) -> tuple[list[Estimated], list[str]]:
  """Formula estimates for every candidate the config accepts; and why the others fail."""
  layouts, out, rejected = {}, [], []
  kind, chips = devices[0].device_kind, len(devices)
  for cand in cands:
    c = cand.apply(config)
    key = (cand.data, cand.fsdp, cand.tensor)
    try:
      cfg = validate_layout(c, chips, "tpu")
      if key not in layouts:
        layouts[key] = build_layout(c, devices)
    except (ConfigError, ValueError) as e:
      rejected.append(f"{cand.label()}: {exits.describe(e)}")
      continue
    layout = layouts[key]
    shape = estimate.Shape(cfg, cand.seq_len, cand.per_device_batch, cand.microbatches,
                           cand.tensor, max(1, c.train.loss_chunk_size // (cand.data * cand.fsdp)))
    out.append(Estimated(cand, estimate.memory_bytes(layout, shape, cand.remat),
                         estimate.step_seconds(layout, shape, cand.remat, chips,
                                               PEAK_FLOPS[kind], ICI_BYTES_PER_S[kind])))
  return out, rejected


def shortlist(estimated: list[Estimated], hbm: float) -> list[Estimated]:
  """The fastest estimate of each (policy, mesh) pair that the memory formula fits (of equal
  times, the smaller), fastest first."""
  best: dict[tuple, Estimated] = {}
  rank = lambda e: (e.seconds, e.memory)
  for e in estimated:
    c = e.candidate
    key = (c.remat, c.data, c.fsdp, c.tensor)
    if e.memory <= hbm and (key not in best or rank(e) < rank(best[key])):
      best[key] = e
  return sorted(best.values(), key=lambda e: e.seconds)


# What a compiled report depends on: the model, trainers, configs and launch.aot's reading.
_COMPILE_SOURCES = ("gemma_jax", "trainers", "configs", "launch/aot.py", "launch/audit.py",
                    "launch/compile_step.py", "launch/hlo.py", "launch/libtpu_flags.py")


def _source_digest() -> str:
  h = hashlib.sha256()
  for name in _COMPILE_SOURCES:
    path = ROOT / name
    for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
      h.update(file.read_bytes())
  return h.hexdigest()


def compile_report(config_path: str, topology: str, overrides: list[str],
                   cache: pathlib.Path | None = None) -> dict:
  """launch.aot's JSON report of one compile, in its own process (a fresh libtpu and its own
  memory); {"error": last line} when it fails. Cached in `cache` when given."""
  cmd = [sys.executable, "-m", "launch.aot", f"--config={config_path}",
         f"--topology={topology}", *overrides]
  env = dict(os.environ)
  libtpu_flags.set_default(env)
  path = None
  if cache is not None:
    key = json.dumps([cmd[1:], env[libtpu_flags.ENV], _source_digest()]).encode()
    path = cache / f"{hashlib.sha256(key).hexdigest()[:24]}.json"
    if path.exists():
      return json.loads(path.read_text())
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    tail = (out.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": tail[:300]}
  report = json.loads(lines[-1])
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
  return report


@dataclasses.dataclass
class Compiled:
  label: str
  overrides: list[str]
  report: dict
  estimated: Estimated | None = None  # None: the baseline (the config as given)

  def peak(self) -> float:
    return self.report.get("per_chip_bytes", {}).get("peak", math.inf)

  def seconds(self) -> float:
    est = self.report.get("step_seconds_estimate") or {}
    return est.get("total", math.inf)

  def outcome(self) -> str:
    if "error" in self.report:
      return f"error: {self.report['error']}"
    return (f"{self.peak() / 2**30:.2f} GiB/chip, est. {self.seconds():.2f} s/step "
            f"({self.report['compile_seconds']} s to compile)")


def compile_shortlist(config_path, topology, user_overrides, short, want, workers, fits,
                      cache, log, max_compiles) -> list[Compiled]:
  """Compile the shortlist best first, `workers` at a time, until `want` of them fit (at
  most `max_compiles`); `log(done, total, compiled)` after each."""
  done: list[Compiled] = []
  limit = min(len(short), max_compiles)
  queue = list(short[:limit])
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    while queue and sum(fits(c) for c in done) < want:
      batch, queue = queue[:workers], queue[workers:]
      jobs = [(e, pool.submit(compile_report, config_path, topology,
                              user_overrides + e.candidate.overrides(), cache)) for e in batch]
      for e, job in jobs:
        done.append(Compiled(e.candidate.label(), e.candidate.overrides(), job.result(), e))
        log(len(done), limit, done[-1])
  return done


def table(rows: list[Compiled], hbm: float, margin: float, chips: int) -> str:
  head = ("| layout (remat, mesh data x fsdp x tensor, batch per device x microbatches) | "
          "formula GiB (est.) | compiled peak GiB/chip | fits | est. s/step | tokens/s/chip | "
          "est. MFU |")
  lines = [head, "|---|---|---|---|---|---|---|"]
  for r in rows:
    formula = f"{r.estimated.memory / 2**30:.2f}" if r.estimated else "-"
    if "error" in r.report:
      lines.append(f"| {r.label} | {formula} | error: {r.report['error']} | no | - | - | - |")
      continue
    rep, fits = r.report, r.peak() <= margin * hbm
    tps = rep.get("tokens_per_s_per_chip")
    mfu = rep.get("mfu_estimate")
    lines.append(f"| {r.label} | {formula} | {r.peak() / 2**30:.2f} | {'yes' if fits else 'NO'} "
                 f"| {r.seconds():.2f} | {f'{tps:,.0f}' if tps else 'n/a'} | "
                 f"{f'{mfu:.0%}' if mfu else 'n/a'} |")
  return "\n".join(lines)


def nearest_topology(topology: str) -> str:
  """The known topology nearest `topology` in chip count (of its generation if known)."""
  kind, _, shape = topology.partition(":")
  try:
    chips = math.prod(int(x) for x in shape.split("x"))
  except ValueError:
    chips = 256
  names = [f"{k}:{s}" for k, shapes in KNOWN_TOPOLOGIES.items() for s in shapes
           if k == kind or kind not in KNOWN_TOPOLOGIES]
  size = lambda name: math.prod(int(x) for x in name.partition(":")[2].split("x"))
  return min(names, key=lambda n: abs(math.log(size(n)) - math.log(max(chips, 1))))


def devices_for(topology: str):
  try:
    return topology_devices(topology)
  except Exception as e:  # libtpu's errors vary by version: any failure is an unknown name
    raise exits.UsageError(f"--topology={topology}: libtpu does not describe it "
                           f"({exits.describe(e)[:120]}); the nearest it does: "
                           f"--topology={nearest_topology(topology)}") from None


def nearest_fitting_tokens(config, rows: int, seq_len: int, devices, hbm: float,
                           skip: int | None = None) -> int | None:
  """The token target nearest rows x seq_len (a power-of-two multiple, rounded up to split
  over some mesh's batch shards) that a candidate fits by the memory formula; None if none."""
  shards = sorted({d * f for d, f, _ in mesh_splits(len(devices))})
  targets = {-(-max(1, round(rows * 2.0**k)) // n) * n for k in range(-8, 9) for n in shards}
  for target in sorted(targets - {skip}, key=lambda r: (abs(math.log(r / rows)), -r)):
    estimated, _ = estimate_all(config, candidates(target, seq_len, len(devices)), devices)
    if shortlist(estimated, hbm):
      return target * seq_len
  return None


def config_file(source: str, out: pathlib.Path, overrides: list[str], topology: str,
                summary: str) -> str:
  """A config file that loads `source` and applies the winner's overrides."""
  values = {}
  for item in overrides:
    key, _, value = item.removeprefix("--config.").partition("=")
    try:
      values[key] = json.loads(value)
    except json.JSONDecodeError:
      values[key] = value
  body = "".join(f"\n      {k!r}: {v!r}," for k, v in values.items())
  return (f'"""Written by `python -m launch.plan` for {topology}: {summary}."""\n\n'
          "import importlib.util\nimport pathlib\n\n"
          f"SOURCE = pathlib.Path(__file__).parent / {os.path.relpath(source, out.parent)!r}\n\n\n"
          "def get_config():\n"
          "  spec = importlib.util.spec_from_file_location('planned_source', SOURCE)\n"
          "  module = importlib.util.module_from_spec(spec)\n"
          "  spec.loader.exec_module(module)\n"
          "  c = module.get_config()\n"
          f"  c.update_from_flattened_dict({{{body}\n  }})\n  return c\n")


def plan(config, config_path: str, topology: str, user_overrides: list[str], *, seq_len: int,
         tokens: int, compiles: int, workers: int, margin: float, max_compiles: int = 6,
         cache: pathlib.Path | None = None, log=print) -> dict:
  """Estimate, compile and choose (see the module docstring): a JSON-able summary."""
  devices = devices_for(topology)
  kind, chips = devices[0].device_kind, len(devices)
  hbm = HBM_BYTES[kind]
  seq_len = seq_len or config.train.seq_len
  tokens = tokens or config.train.global_batch_size * config.train.seq_len
  if tokens % seq_len:
    raise exits.UsageError(f"--tokens_per_step={tokens} is not a multiple of --seq_len="
                           f"{seq_len}; the nearest that is: "
                           f"{max(1, round(tokens / seq_len)) * seq_len}")
  rows = tokens // seq_len
  estimated, rejected = estimate_all(config, candidates(rows, seq_len, chips), devices)
  short = shortlist(estimated, hbm)
  log(f"plan: {config.model.preset} on {topology} ({chips} x {kind}), {tokens:,} tokens per step"
      f" ({rows} x {seq_len}): {len(estimated)} candidates, {len(rejected)} refused by the "
      f"config, {len(short)} (policy, mesh) pairs kept by the memory formula")
  if not short:
    raise _no_fit(config, rows, seq_len, devices, hbm, "by the memory formula")
  fits = lambda c: "error" not in c.report and c.peak() <= margin * hbm
  progress = lambda i, n, c: log(f"  compile {i}/{n}: {c.label}: {c.outcome()}")
  given = as_candidate(config, chips, rows, seq_len)
  baseline = Compiled(f"baseline, the config's layout: {given.label()}", given.overrides(), {})
  try:
    validate_layout(given.apply(config), chips, "tpu")
    baseline.report = compile_report(config_path, topology,
                                     user_overrides + given.overrides(), cache)
  except ConfigError as e:
    baseline.report = {"error": exits.describe(e)}
  log(f"  {baseline.label}: {baseline.outcome()}")
  done = compile_shortlist(config_path, topology, user_overrides, short, compiles, workers,
                           fits, cache, progress, max(compiles, max_compiles))
  winners = sorted((c for c in [baseline, *done] if fits(c)), key=Compiled.seconds)
  if not winners:
    raise _no_fit(config, rows, seq_len, devices, hbm, f"compiled, within --margin={margin}",
                  skip=rows)
  best = winners[0]
  return {"config": config.model.preset, "topology": topology, "tokens_per_step": tokens,
          "seq_len": seq_len, "hbm_bytes": hbm, "margin": margin,
          "table": table([baseline, *done], hbm, margin, chips),
          "baseline": baseline.report, "compiled": [dataclasses.asdict(c) for c in done],
          "winner": {"label": best.label, "overrides": user_overrides + best.overrides,
                     "report": best.report}}


def _no_fit(config, rows, seq_len, devices, hbm, how, skip=None) -> exits.UsageError:
  near = nearest_fitting_tokens(config, rows, seq_len, devices, hbm, skip)
  hint = (f"the nearest that fits (memory formula, an estimate): --tokens_per_step={near}"
          if near else "no token target does: try a shorter --seq_len or a larger topology")
  return exits.UsageError(f"no layout of {config.model.preset} fits {hbm / 2**30:g} GiB per "
                          f"chip at {rows * seq_len:,} tokens per step ({how}); {hint}")


def _config_path_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
  path, overrides = None, []
  for i, arg in enumerate(argv):
    if arg.startswith("--config.") and "=" in arg:
      overrides.append(arg)
    elif arg.startswith("--config="):
      path = arg.partition("=")[2]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path, overrides


def _run(argv: list[str]) -> int:
  config_path, user_overrides = _config_path_and_overrides(argv)
  if not config_path:
    raise exits.UsageError("--config is required: a job config file, e.g. configs/gemma_7b.py")
  cache = pathlib.Path(os.environ.get("GEMMA_JAX_CACHE",
                                      pathlib.Path.home() / ".cache" / "gemma_jax")) / "plan"
  result = plan(_CONFIG.value, config_path, _TOPOLOGY.value, user_overrides,
                seq_len=_SEQ_LEN.value, tokens=_TOKENS.value, compiles=_COMPILES.value,
                workers=_WORKERS.value, margin=_MARGIN.value, max_compiles=_MAX_COMPILES.value,
                cache=cache)
  print(result["table"])
  win = result["winner"]
  rep = win["report"]
  summary = (f"{win['label']}: {rep['per_chip_gib']:.2f} GiB per chip, est. "
             f"{rep['step_seconds_estimate']['total']:.2f} s per step at "
             f"{result['tokens_per_step']:,} tokens")
  stem = pathlib.Path(config_path).stem
  out = pathlib.Path(_OUT.value or f"configs/plan_{stem}_{result['seq_len']}.py")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(config_file(config_path, out, win["overrides"], result["topology"], summary))
  print(f"winner: {summary}\n  overrides: {' '.join(win['overrides'])}\n  config file: {out}")
  print(json.dumps({k: v for k, v in result.items() if k != "table"}))
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return exits.run("launch.plan", _run, sys.argv[1:], traceback=_TRACEBACK.value)


if __name__ == "__main__":
  app.run(main)
