"""Shared test fixtures: paths into ../shared (reference outputs of the official code)."""
import os

os.environ.setdefault("MUJOCO_GL", "disable")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # 2 CPU devices for data-parallel tests
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
FIXTURES = os.path.join(SHARED, "fixtures")
if not os.path.isdir(FIXTURES):
    raise RuntimeError(f"reference material not found at {SHARED}: tests need ../shared beside the repo")

FP16_CKPT = os.path.join(FIXTURES, "td-mpc-opt", "mt30_1M_steps_045dist_fp16.pt")
INT8_CKPT = os.path.join(FIXTURES, "td-mpc-opt", "mt30_1M_steps_045dist_int8.pt")
MIXED_CKPT = os.path.join(FIXTURES, "td-mpc-opt", "mt30_1M_steps_045dist_mixed.pt")
MODEL_OUTPUTS = os.path.join(FIXTURES, "reference", "model_outputs_mt30_1M.json")
ENV_REPLAY = os.path.join(FIXTURES, "reference", "env_replay_mt30.json")


@pytest.fixture(scope="session")
def released_agent():
    import tdmpc_jax
    return tdmpc_jax.load_checkpoint(FP16_CKPT)
