"""lm-evaluation-harness with the gemma_jax model on local tasks (no hub access) gives the
numbers of gemma_jax.eval on the same data: the harness's own prompt building, few-shot
sampling, context/continuation encoding and rolling windows against gemma_jax.eval's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from gemma_jax.checkpoint import save_model_dir  # noqa: E402
from gemma_jax.config import get_config  # noqa: E402
from gemma_jax.eval import Evaluator, load_task  # noqa: E402
from gemma_jax.eval.tasks import SHIPPED_DIR  # noqa: E402
from gemma_jax.model import init_model  # noqa: E402
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

pytest.importorskip("gemma_jax.eval.lm_eval_adapter")  # registers the model "gemma_jax"

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
REPO = Path(__file__).resolve().parents[1]


def task_yaml(name: str, kind: str, test: Path, fewshot: Path | None, num_fewshot: int) -> str:
  """A harness task over a local JSONL file, written as gemma_jax.eval reads the same file."""
  files = {"test": str(test), **({"train": str(fewshot)} if fewshot else {})}
  common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "test_split": "test", "num_fewshot": num_fewshot,
            **({"fewshot_split": "train"} if fewshot else {})}
  per_kind = {
      "multiple_choice": {"output_type": "multiple_choice", "doc_to_text": "context",
                          "doc_to_choice": "choices", "doc_to_target": "label",
                          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
      "perplexity": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                     "doc_to_target": "text",
                     "metric_list": [{"metric": m} for m in ("word_perplexity",
                                                             "byte_perplexity",
                                                             "bits_per_byte")]},
      "generation": {"output_type": "generate_until", "doc_to_text": "prompt",
                     "doc_to_target": "answer",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8,
                                           "do_sample": False},
                     "filter_list": [{"name": "extract", "filter": [
                         {"function": "regex", "regex_pattern": r"(-?\d+)"},
                         {"function": "take_first"}]}],
                     "metric_list": [{"metric": "exact_match"}]},
  }
  return json.dumps({**common, **per_kind[kind]})  # JSON is YAML


SHIPPED = {"gj_arithmetic_mc": ("multiple_choice", "arithmetic_mc", 3),
           "gj_word_completion": ("multiple_choice", "word_completion", 2),
           "gj_prose": ("perplexity", "prose", 0),
           "gj_arithmetic_gen": ("generation", "arithmetic_gen", 3)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lm_eval")
  spm = train_sentencepiece([CORPUS], tmp / "spm", 512)
  cfg = get_config("tiny_gemma3", dtype="float32")  # scanned: many shapes compile faster
  model = init_model(cfg, seed=5)
  save_model_dir(tmp / "model", cfg, model, tokenizer_model=spm)
  tasks = tmp / "tasks"
  tasks.mkdir()
  for name, (kind, stem, shots) in SHIPPED.items():
    fewshot = SHIPPED_DIR / f"{stem}_fewshot.jsonl" if shots else None
    (tasks / f"{name}.yaml").write_text(task_yaml(name, kind, SHIPPED_DIR / f"{stem}.jsonl",
                                                  fewshot, shots))
  return tmp / "model", model, Tokenizer(spm), tasks


LIMIT = 4
COMPARED_TASKS = ["gj_arithmetic_mc", "gj_prose", "gj_arithmetic_gen"]  # one of each kind
COMPARED = {"multiple_choice": {"acc", "acc_norm"}, "generation": {"exact_match"},
            "perplexity": {"word_perplexity", "byte_perplexity", "bits_per_byte"}}


@pytest.mark.slow  # imports lm_eval and runs the harness, ~55 s
def test_harness_numbers_equal_gemma_jax_eval(setup):
  path, model, tok, tasks = setup
  out = lm_eval.simple_evaluate(
      model="gemma_jax", model_args=f"checkpoint={path},batch_size=4", tasks=COMPARED_TASKS,
      task_manager=TaskManager(include_path=str(tasks)), limit=LIMIT, log_samples=True,
      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=1234)
  ev = Evaluator(model, tok, batch_size=4, progress=False)
  spec = {"gj_arithmetic_mc": "arithmetic_mc", "gj_prose": "prose_perplexity",
          "gj_arithmetic_gen": "arithmetic_gen"}
  for name, ours_name in spec.items():
    ours, theirs = ev.run(load_task(ours_name), LIMIT), out["results"][name]
    theirs = {k.split(",")[0]: v for k, v in theirs.items() if "stderr" not in k and "," in k}
    assert set(theirs) == COMPARED[SHIPPED[name][0]] and set(theirs) <= set(ours), name
    for metric, value in theirs.items():
      assert ours[metric] == pytest.approx(value, rel=1e-5), (name, metric)
  # Per choice, not only the argmax: the same prompts, boundaries and scores.
  lls = ev.choice_loglikelihoods(load_task("arithmetic_mc"))
  samples = sorted(out["samples"]["gj_arithmetic_mc"], key=lambda s: s["doc_id"])
  for sample in samples:
    theirs = [r[0][0] for r in sample["resps"]]
    assert theirs == pytest.approx(lls[sample["doc_id"]], rel=1e-5, abs=1e-5)
  assert len(samples) == LIMIT


@pytest.mark.slow  # a fresh process: imports lm_eval and compiles again (~25 s)
def test_lm_eval_cli_wrapper_finds_the_model(setup, tmp_path):
  path, _, _, tasks = setup
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1",
         "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}
  run = subprocess.run(
      [sys.executable, "-m", "gemma_jax.eval.lm_eval_cli", "--model", "gemma_jax",
       "--model_args", f"checkpoint={path},mesh=1x1x1", "--tasks", "gj_word_completion",
       "--include_path", str(tasks), "--limit", "2", "--output_path", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "gj_word_completion" in run.stdout and "acc_norm" in run.stdout
