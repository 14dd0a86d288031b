"""gemma3_4b: pretraining on a 16x16 TPU v5e pod (see configs/pod.py for the layout)."""

from configs import pod


def get_config():
  return pod.get_config("gemma3_4b")
