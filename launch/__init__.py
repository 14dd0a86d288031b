"""Job launchers: TPU VM pods, local multi-process CPU emulation, ahead-of-time compilation."""
