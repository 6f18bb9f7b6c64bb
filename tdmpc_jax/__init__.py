"""tdmpc_jax: TD-MPC2 world models in JAX/Flax: load, distill, quantize and evaluate."""
from tdmpc_jax.agent import Agent, load_checkpoint
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.config import ModelConfig, make_model_config

__all__ = ["Agent", "CheckpointError", "ModelConfig", "load_checkpoint", "make_model_config"]
__version__ = "0.1.0"
