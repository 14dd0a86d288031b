"""The flagship layout shared by the pod configs: a 16x16 TPU v5e pod (256 chips, 16 GiB each).

Pure ZeRO-3: fsdp spans all 256 chips (one slice, so no DCN axes). A step is
512 sequences x 2048 tokens = 1,048,576 tokens (2 sequences per chip). Weights and Adam
moments in float32 (12 bytes/param, 1/256 per chip), compute in bfloat16, each block fully
rematerialised (only its input is kept), and the 256K-vocabulary loss computed in chunks of
65,536 tokens: 256 per chip, each chip its own (gemma_jax.losses), 16 trips over the gathered
table (4096-token chunks would read the 1 GB table 256 times a step, for the same peak). The
per-chip peaks are in benchmarks/pod_fit.md; a cheaper remat policy
(--config.model.remat_policy=save_qkv_proj) is worth trying on real hardware.
`python -m launch.aot --config configs/<model>.py --topology v5e:16x16` checks the fit.
"""

from configs import base


def get_config(preset: str):
  c = base.get_config()
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat_policy = "full"
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.train.update(global_batch_size=512, seq_len=2048, steps=100_000, loss_chunk_size=65536)
  c.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
  return c
