"""Test setup: 8 emulated CPU devices before JAX starts, and float32 everywhere by default."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# AOT tests load libtpu only for topology descriptions; let them coexist with other users.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
