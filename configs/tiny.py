"""CPU default: a tiny Gemma 3 on all local devices (fsdp fills the mesh)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.preset = "tiny_gemma3"
  c.model.dtype = "float32"
  return c
