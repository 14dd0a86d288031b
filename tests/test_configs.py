"""Job configs: every shipped file validates, and bad ones fail at start-up naming the key."""

import dataclasses
import importlib
import json

import ml_collections
import pytest

from configs import base, tiny
from configs.base import ConfigError, validate
from trainers import cli, loop, pretrain

DEVICES = 8  # tests/conftest.py


@pytest.mark.parametrize("name", ["tiny", "gemma_2b", "gemma_7b", "gemma2_9b", "dpo_tiny",
                                  "dpo_gemma3_270m", "dpo_gemma_2b", "grpo_tiny"])
def test_shipped_configs_follow_the_schema(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  base._check_schema(config, base.get_config(), "config")
  if name in ("tiny", "dpo_tiny", "grpo_tiny"):
    assert validate(config, DEVICES).name == "tiny_gemma3"


def test_data_shape_follows_train():
  c = tiny.get_config()
  c.train.seq_len, c.train.global_batch_size = 32, 16
  assert (c.data.seq_len, c.data.batch_size) == (32, 16)
  c.data.seq_len = 48  # either side of the link sets both
  assert c.train.seq_len == 48


def _set(path, value):
  def change(c):
    *parents, key = path.split(".")
    section = c
    for p in parents:
      section = section[p]
    section[key] = value
  return change


BAD = [  # (change to configs/tiny.py, text the error must contain)
    (_set("model.preset", "gemma_9000"), "config.model: unknown model preset 'gemma_9000'"),
    (_set("model.remat_policy", "sometimes"), "remat_policy='sometimes'"),
    (_set("train.steps", 0), "config.train.steps=0 must be >= 1"),
    (_set("train.seq_len", 4096), "config.train.seq_len=4096 exceeds"),
    (_set("train.microbatches", 3), "config.train.global_batch_size=8 must be a multiple"),
    (_set("train.global_batch_size", 4), "config.train.global_batch_size=4"),
    (_set("train.non_finite", "ignore"), "config.train.non_finite='ignore'"),
    (_set("mesh.fsdp", 3), "config.mesh.fsdp=3"),
    (_set("mesh.tensor", 3), "config.mesh.tensor=3: cannot fill 8 devices"),
    (_set("optimizer.schedule", "exp"), "config.optimizer.schedule='exp'"),
    (_set("optimizer.warmup_steps", 1000), "config.optimizer.warmup_steps=1000"),
    (_set("optimizer.b2", 1.5), "config.optimizer.b2=1.5"),
    (_set("data.sources", ()), "config.data.sources is empty"),
    (_set("data.sources", ({"path": "/nonexistent/*.jsonl"},)), "config.data.sources[0].path"),
    (_set("data.packing", "tight"), "config.data.packing"),
    (_set("tokenizer.path", "/nonexistent.model"), "config.tokenizer: set exactly one"),
    (_set("tokenizer.vocab_size", 4096), "config.tokenizer.vocab_size=4096"),
    (_set("eval.sources", ()), "config.eval.every=100 needs config.eval.sources"),
    (_set("checkpoint.every", 0), "config.checkpoint.every=0 must be >= 1"),
    (_set("logging.every", -1), "config.logging.every=-1"),
    (_set("init_from", "/nonexistent"), "config.init_from='/nonexistent'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split("=")[0].split(":")[0]
                                                        for _, m in BAD])
def test_bad_config_names_the_key(change, message):
  c = tiny.get_config()
  c.unlock()
  change(c)
  with pytest.raises(ConfigError) as e:
    validate(c, DEVICES)
  assert message in str(e.value)


def test_schema_catches_keys_and_types_of_configs_built_in_python():
  c = tiny.get_config().to_dict()
  c["train"]["stepz"] = 5
  with pytest.raises(ConfigError, match=r"config.train: unknown key\(s\) \['stepz'\]"):
    validate(_config_dict(c), DEVICES)
  c = tiny.get_config().to_dict()
  c["train"]["steps"] = "ten"
  with pytest.raises(ConfigError, match="config.train.steps='ten' should be of type int"):
    validate(_config_dict(c), DEVICES)
  c = tiny.get_config().to_dict()
  del c["checkpoint"]
  with pytest.raises(ConfigError, match=r"config: missing key\(s\) \['checkpoint'\]"):
    validate(_config_dict(c), DEVICES)


def _config_dict(d):
  return ml_collections.ConfigDict(d)


def _argv(*overrides):
  return ["pretrain", "--config", "configs/tiny.py", *overrides, "--workdir", "/tmp/unused"]


@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=5"], "--config.train.stepz: config.train has no key 'stepz' "
                                 "(did you mean 'steps'?)"),
    (["--config.optimiser.b1=0.8"], "config has no key 'optimiser' (did you mean 'optimizer'?)"),
    (["--config.train.steps=ten"], "--config.train.steps=ten: invalid literal for int()"),
    (["--config.model.embed_dim=1.5"], "--config.model.embed_dim=1.5"),
])
def test_command_line_overrides_fail_naming_the_key(args, message):
  with pytest.raises(ConfigError) as e:
    cli.parse(_argv(*args))
  assert message in str(e.value)


def test_command_line_overrides_and_required_flags():
  config, workdir, distributed = cli.parse(_argv(
      "--config.train.steps=7", "--config.model.remat_policy=full",
      "--config.data.sources=({'path': 'x.jsonl'},)"))
  assert (config.train.steps, config.model.remat_policy, workdir, distributed) == \
      (7, "full", "/tmp/unused", False)
  assert config.data.sources == ({"path": "x.jsonl"},)
  with pytest.raises(ConfigError, match="--workdir is required"):
    cli.parse(["pretrain", "--config", "configs/tiny.py"])
  with pytest.raises(ConfigError, match="--config is required"):
    cli.parse(["pretrain", "--workdir", "/tmp/x"])
  assert cli.main(pretrain.TASK, _argv("--config.train.steps=0")) == 2


def test_trainer_refuses_other_data_or_another_models_workdir(tmp_path):
  c = tiny.get_config()
  c.data.format = "chat"
  with pytest.raises(ConfigError, match="config.data.format='chat', but the pretrain trainer"):
    loop.Trainer(c, tmp_path, pretrain.TASK)
  cfg = json.loads(json.dumps(dataclasses.asdict(base.model_config(c))))
  cfg["embed_dim"] = 128
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  c = tiny.get_config()
  with pytest.raises(ConfigError, match=r"holds a model with other \['embed_dim'\]"):
    loop.Trainer(c, tmp_path, pretrain.TASK)
