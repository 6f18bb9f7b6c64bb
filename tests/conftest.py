"""Test fixtures, all inside the repository: the released TD-MPC-Opt checkpoints (checkpoints/td-mpc-opt)
and reference outputs of the official code (tests/data/reference)."""
import os

os.environ.setdefault("MUJOCO_GL", "disable")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # 2 CPU devices for data-parallel tests
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(REPO, "checkpoints", "td-mpc-opt")  # TD-MPC-Opt release (MIT), committed
REFERENCE = os.path.join(REPO, "tests", "data", "reference")  # official-code outputs, see its README

FP16_CKPT = os.path.join(RELEASED, "mt30_1M_steps_045dist_fp16.pt")
INT8_CKPT = os.path.join(RELEASED, "mt30_1M_steps_045dist_int8.pt")
MIXED_CKPT = os.path.join(RELEASED, "mt30_1M_steps_045dist_mixed.pt")
MODEL_OUTPUTS = os.path.join(REFERENCE, "model_outputs_mt30_1M.json")
ENV_REPLAY = os.path.join(REFERENCE, "env_replay_mt30.json")


@pytest.fixture(scope="session")
def released_agent():
    import tdmpc_jax
    return tdmpc_jax.load_checkpoint(FP16_CKPT)
