"""Bad input at every entry point ends with one line naming what is wrong and where, and a
non-zero status; a run that an error stops saves first (gemma_jax/exits.py)."""

import json
import math
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from configs import tiny
from gemma_jax import checkpoint, exits
from gemma_jax import generate as generate_cli
from gemma_jax import info as info_cli
from gemma_jax.convert import __main__ as convert_cli
from gemma_jax.lora import __main__ as lora_cli
from launch import local as local_cli
from trainers import cli, hooks, pretrain

REPO = Path(__file__).resolve().parent.parent


def error_lines(capsys) -> list[str]:
  """stderr's lines, after asserting that no traceback is among them."""
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return [line for line in err.splitlines() if line.strip()]


# -- exits -----------------------------------------------------------------------------------

def failing(error: Exception):
  def main(argv):
    assert "--traceback" not in argv
    raise error
  return main


def test_an_error_is_one_line_and_a_status(capsys):
  error = ValueError("data.jsonl:3: missing field 'text'\n(second line)")
  error.add_note("(checkpoint step 4 is saved)")
  assert exits.run("prog", failing(error), ["--x"]) == exits.EXIT_ERROR
  assert error_lines(capsys) == ["prog: error: data.jsonl:3: missing field 'text' (second line) "
                                 "(checkpoint step 4 is saved)"]
  assert exits.run("prog", failing(exits.UsageError("--flag: bad")), []) == exits.EXIT_USAGE
  assert exits.run("prog", failing(TypeError("oops")), []) == exits.EXIT_ERROR
  assert error_lines(capsys) == ["prog: error: --flag: bad",
                                 "prog: error: TypeError: oops (--traceback shows where)"]


def test_traceback_on_request(monkeypatch):
  with pytest.raises(ValueError, match="boom"):
    exits.run("prog", failing(ValueError("boom")), ["--traceback"])
  monkeypatch.setenv(exits.TRACEBACK_ENV, "1")
  with pytest.raises(ValueError, match="boom"):
    exits.run("prog", failing(ValueError("boom")), [])


# -- config files ----------------------------------------------------------------------------

CONFIG_HEAD = "from configs.tiny import get_config as tiny\n\n"


@pytest.mark.parametrize("body, line, message", [
    ("def get_config(:\n  return tiny()\n", 3, "invalid syntax"),
    ("def get_config():\n  c = tiny()\n  c.train.stepz = 3\n  return c\n", 5,
     "sets 'stepz', which the config has no key for (did you mean 'steps'?)"),
    ("def get_config():\n  return tiny(undefined_name)\n", 4, "NameError"),
])
def test_config_file_errors_name_file_and_line(tmp_path, capsys, body, line, message):
  path = tmp_path / "job.py"
  path.write_text(CONFIG_HEAD + body)
  status = cli.main(pretrain.TASK, ["pretrain", "--config", str(path), "--workdir", "/tmp/x"])
  lines = error_lines(capsys)
  assert status == exits.EXIT_USAGE and len(lines) == 1, lines
  assert lines[0].startswith(f"config error: {path}, line {line}: ") and message in lines[0]


# -- runs that an error stops: saved first ---------------------------------------------------

@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """The runs below compile the same step: a persistent cache makes that once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(keys[1], 0)
  jax.config.update(keys[2], 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def job_config(tmp_path: Path, data: Path, **train) -> Path:
  """A config file for the tiny model on `data`, checkpointing every 4 steps."""
  path = tmp_path / "job.py"
  path.write_text(CONFIG_HEAD + f"""def get_config():
  c = tiny()
  c.data.sources = ({{"path": {str(data)!r}}},)
  c.train.update(steps=12, seq_len=32, **{train!r})
  c.eval.every = 0
  c.checkpoint.update(every=4, async_save=False)
  c.optimizer.warmup_steps = 2
  c.data.shuffle = False  # the bad record comes where it stands in the file
  c.logging.every = 4
  return c
""")
  return path


def records(tmp_path: Path, count: int, bad_line: int | None = None) -> Path:
  lines = [json.dumps({"text": f"record {i} says hello to the tiny model"}) for i in range(count)]
  if bad_line:
    lines[bad_line - 1] = '{"text": "unterminated'
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def train(config: Path, workdir: Path, *overrides: str) -> int:
  return cli.main(pretrain.TASK, ["pretrain", "--config", str(config), "--workdir",
                                  str(workdir), *overrides])


def test_a_bad_record_deep_in_a_run_saves_first(tmp_path, capsys, compile_cache):
  data = records(tmp_path, 400, bad_line=130)
  config, workdir = job_config(tmp_path, data), tmp_path / "w"
  assert train(config, workdir) == exits.EXIT_ERROR
  error = error_lines(capsys)[-1]
  saved = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=3).steps()[-1]
  assert error.startswith(f"pretrain: error: {data}:130: malformed JSON") and \
      f"(checkpoint step {saved} is saved: rerunning resumes from it)" in error, error
  assert 4 < saved < 12 and saved % 4 != 0  # saved where the record stopped it
  assert train(config, workdir, "--config.data.skip_bad_records=True") == exits.EXIT_OK
  assert f"resumed from checkpoint step {saved}" in capsys.readouterr().out


def test_steps_skipped_in_a_row_end_the_run(tmp_path, capsys, caplog, compile_cache):
  config = job_config(tmp_path, records(tmp_path, 400))
  status = train(config, tmp_path / "w", "--config.optimizer.learning_rate=1e12",
                 "--config.train.max_skipped_in_a_row=3")
  lines = error_lines(capsys)
  assert status == exits.EXIT_ERROR, lines
  assert "3 steps in a row were skipped (config.train.max_skipped_in_a_row=3)" in lines[-1]
  assert "is saved: rerunning resumes from it" in lines[-1]
  warnings = [m for m in caplog.messages if "the update was skipped" in m]
  assert len(warnings) == 3 and all("non-finite loss nan" in w for w in warnings), warnings
  assert train(config, tmp_path / "w2", "--config.optimizer.learning_rate=1e12",
               "--config.train.non_finite=stop") == exits.EXIT_ERROR
  assert "stopping (config.train.non_finite='stop')" in error_lines(capsys)[-1]


def test_skip_warning_names_the_values_that_were_not_finite(caplog):
  hooks.report_non_finite(7, {"loss": 2.5, "grad_norm": math.inf}, "skip", 1, 5)
  assert caplog.messages == ["step 7: non-finite gradient norm inf (loss 2.5); the update "
                             "was skipped"]
  with pytest.raises(hooks.NonFiniteError, match="5 steps in a row"):
    hooks.report_non_finite(7, {"loss": math.nan, "grad_norm": 1.0}, "skip", 5, 5)
  hooks.report_non_finite(7, {"loss": math.nan, "grad_norm": 1.0}, "skip", 50, 0)  # no limit


# -- model files -----------------------------------------------------------------------------

def tiny_gguf(path: Path) -> Path:
  writer = gguf.GGUFWriter(path, "gemma3")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.ones((64, 16), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def gguf_variant(tmp_path: Path, kind: str) -> Path:
  data = bytearray(tiny_gguf(tmp_path / "good.gguf").read_bytes())
  if kind == "truncated":
    data = data[:-100]
  elif kind == "magic":
    data[:4] = b"GGML"
  elif kind == "version":
    data[4:8] = (7).to_bytes(4, "little")
  elif kind == "metadata":
    data = data[:40]
  path = tmp_path / f"{kind}.gguf"
  path.write_bytes(bytes(data))
  return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated or damaged: tensor 'token_embd.weight' (F32 (64, 16)) needs bytes"),
    ("magic", "not a GGUF file (it starts with b'GGML', not b'GGUF')"),
    ("version", "GGUF version 7; the gguf package reads versions [2, 3]"),
    ("metadata", "damaged GGUF metadata or tensor table"),
])
def test_convert_names_the_gguf_file_and_what_is_wrong(tmp_path, capsys, kind, message):
  path = gguf_variant(tmp_path, kind)
  assert convert_cli.main(["--from", "gguf", str(path), "--to", str(tmp_path / "out")]) == 1
  lines = error_lines(capsys)
  assert len(lines) == 1 and lines[0].startswith(f"gemma_jax.convert: error: {path}: {message}")


@pytest.fixture
def garbage_model_dir(tmp_path) -> Path:
  directory = tmp_path / "model"
  directory.mkdir()
  (directory / "config.json").write_text('{"name": "x", "vocab_size": ,}')
  return directory


def test_garbage_config_json_is_named(garbage_model_dir, capsys):
  where = f"{garbage_model_dir / 'config.json'}: invalid JSON at line 1 column 29"
  assert generate_cli.main(["--checkpoint", str(garbage_model_dir), "--prompt", "x"]) == 2
  assert error_lines(capsys) == [f"gemma_jax.generate: error: {where}: Expecting value"]
  assert convert_cli.main(["--from", "hf", str(garbage_model_dir), "--to",
                           str(garbage_model_dir.parent / "out")]) == 1
  assert error_lines(capsys) == [f"gemma_jax.convert: error: {where}: Expecting value"]


def test_other_entry_points_end_in_one_line(tmp_path, capsys):
  status = lora_cli.main(["merge", "--adapters", str(tmp_path), "--out", str(tmp_path / "o")])
  assert status == 2 and len(lines := error_lines(capsys)) == 1
  assert lines[0].startswith(f"gemma_jax.lora: error: {tmp_path / 'lora.json'}: not found")
  assert local_cli.main(["--processes", "0", "--", "true"]) == 2
  assert error_lines(capsys) == ["launch.local: error: --processes=0 and --devices-per-process=4 "
                                 "must be >= 1"]
  assert info_cli.main(["--model", "gemma_2b"]) == 0
  assert json.loads(capsys.readouterr().out)["config"]["name"] == "gemma_2b"


def test_entry_points_run_through_exits():
  """Every `python -m` entry point's main goes through exits (a new one must too)."""
  mains = [p for d in ("gemma_jax", "trainers", "launch") for p in (REPO / d).rglob("*.py")
           if p.name == "__main__.py" or 'if __name__ == "__main__"' in p.read_text()]
  unguarded = [str(p.relative_to(REPO)) for p in mains
               if "exits." not in p.read_text() and "cli.main(" not in p.read_text()]
  assert len(mains) > 10 and not unguarded, unguarded


def test_no_save_inside_a_rollout_cycle_or_at_step_0():
  """GRPO resumes only from a cycle's start; a save anywhere else would not resume exactly."""
  from types import SimpleNamespace

  from trainers import loop

  class Checkpoints:
    saved: list[int] = []

    def wait(self):
      pass

    def steps(self):
      return [4]

  def trainer(step, period):
    return SimpleNamespace(state={"w": jax.numpy.ones(2)}, step_count=step,
                           checkpoint_period=period, checkpoints=Checkpoints(),
                           save=lambda: Checkpoints.saved.append(step))

  for step, period, saved in ((6, 4, []), (0, 1, []), (6, 2, [6]), (4, 1, [])):
    Checkpoints.saved = []
    error = ValueError("boom")
    loop.Trainer._save_before_stopping(trainer(step, period), error)
    assert Checkpoints.saved == saved, (step, period)
    assert ("inside a rollout cycle" in " ".join(getattr(error, "__notes__", []))) == \
        ((step, period) == (6, 4))
