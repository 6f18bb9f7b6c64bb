"""Checkpoint I/O: official PyTorch files (read without torch, written for export) and Orbax."""
from tdmpc_jax.checkpoints.errors import CheckpointError

__all__ = ["CheckpointError"]
