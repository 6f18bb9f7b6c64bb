"""tdmpc_jax: TD-MPC2 world models in JAX/Flax: load, distill, quantize and evaluate.

The names below are imported on first use (PEP 562), so that `from tdmpc_jax import cli` does not import JAX:
an entry point refuses a bad flag before it pays for JAX's import (~1.5 s here)."""
import importlib

_EXPORTS = {"Agent": "tdmpc_jax.agent", "load_checkpoint": "tdmpc_jax.agent",
            "CheckpointError": "tdmpc_jax.checkpoints.errors",
            "ModelConfig": "tdmpc_jax.config", "make_model_config": "tdmpc_jax.config"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tdmpc_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
