"""Test setup: 8 emulated CPU devices before JAX starts, and shared fixtures."""

import os
from pathlib import Path

# XLA:CPU aborts the process when a collective's rendezvous waits 40 s (its default); 8
# emulated devices on 2 busy cores can starve one device's thread that long, so allow 5 min.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=300").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# AOT tests load libtpu only for topology descriptions; let them coexist with other users.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

from gemma_jax.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402  (no JAX import)

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Tokenizer:
  """A 1000-piece Gemma-layout tokenizer trained once on the shipped corpus."""
  return Tokenizer(train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm") / "t", 1000))
