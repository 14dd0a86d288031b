"""The libtpu flags a TPU job runs with by default: the set MaxText uses on v5e pods.

They let XLA run collectives asynchronously, fuse them with the compute around them and
overlap the two (the all-gather of the next layer's weights with this layer's matmuls, the
gradient reduce-scatter with the backward), and optimise data-parallel all-reduces of
different sizes. `launch.tpu_vm run` exports them as LIBTPU_INIT_ARGS unless the job sets
its own (`--env LIBTPU_INIT_ARGS=...`; an empty value runs with libtpu's defaults), and
`launch.aot` / `launch.plan` compile with them, so the compiled program they read is the one
the pod runs.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV = "LIBTPU_INIT_ARGS"
FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
DEFAULT = " ".join(FLAGS)


def set_default(env: MutableMapping[str, str] = os.environ) -> str:
  """Put the default flags in `env` unless it already names LIBTPU_INIT_ARGS; its value."""
  return env.setdefault(ENV, DEFAULT)
