"""Test fixtures, all inside the repository: the released TD-MPC-Opt checkpoints (checkpoints/td-mpc-opt)
and reference outputs of the official code (tests/data/reference)."""
import gc
import os
import sys

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """After each test file, drop JAX's compiled executables. XLA's CPU backend maps ~5 memory regions per
    executable and keeps them while a jit cache holds it; a process that compiles its way through many files
    reaches the kernel's vm.max_map_count (65530 here) and dies in backend_compile with a segmentation fault
    (seen at 71% of the suite in one process, `TEST_WORKERS=0`). Fixtures keep their objects; only the
    compiled code goes, and the next file compiles what it calls."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()


# Files whose time is XLA's compile, not the run (backend compile 75-88% of the file's time, measured with
# JAX's monitoring events over the whole suite on 2026-12-07): they compile with most of XLA's optimization
# passes off (jax_disable_most_optimizations: the backend's -O0, no expensive LLVM passes): the nine files
# took 530 s serially instead of 783 s.
# The computations and what each test compares stay the same; only the generated code is less optimized.
# Not here: files that run episodes or long loops (they would run slower) and planner_test.py, whose
# lean-vs-plain MPPI comparison is tuned to the default build (at -O0 an elite flips; numerics, not a bug).
COMPILE_BOUND = frozenset({
    "fused_update_test.py", "update_fidelity_test.py", "extend_distill_test.py", "losses_test.py",
    "plan_terms_test.py", "plan_fidelity_test.py", "networks_test.py", "extend_task_test.py",
    "scalar_math_test.py",
})


@pytest.fixture(autouse=True, scope="module")
def _compile_effort(request):
    """Most XLA optimizations off while a COMPILE_BOUND file runs (read at each compile; jit caches are dropped
    between files by _release_compiled_code, so no executable crosses over)."""
    if os.path.basename(str(request.path)) not in COMPILE_BOUND:
        yield
        return
    import jax
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def released_agent():
    import tdmpc_jax
    return tdmpc_jax.load_checkpoint(FP16_CKPT)


# Seconds per test file, measured on the 2-core machine (two xdist workers, two study units beside them:
# ~2x CI's times; study_test and cli_validation_test scaled by their speed-up of 2026-12-07, measured beside
# an MPPI evaluation: 490 -> 347 s and ~520 -> 283 s; the COMPILE_BOUND files and overlap_test by their
# speed-up without most XLA optimizations, 2026-12-07: 783 -> 530 s serial; only the order matters). `make test` schedules whole files (--dist loadfile) in
# collection order (--no-loadscope-reorder), and this hook collects the longest first, so that no long
# file starts when the other worker is nearly done (longest-processing-time-first). A file missing here
# counts as long: a new file is never the one left running alone at the end.
FILE_SECONDS = {
    "study_test.py": 440, "fused_update_test.py": 420, "cli_validation_test.py": 330, "train_test.py": 553,
    "overlap_test.py": 470, "planner_test.py": 355, "export_test.py": 315, "update_fidelity_test.py": 155,
    "pipeline_test.py": 221, "extend_distill_test.py": 140, "crash_safety_test.py": 201, "evaluation_test.py": 250,
    "quantize_test.py": 101, "losses_test.py": 60, "plan_fidelity_test.py": 55, "extend_format_test.py": 80,
    "plan_terms_test.py": 50, "networks_test.py": 27, "rollout_test.py": 110, "envs_test.py": 27,
    "convert_cli_test.py": 23, "envs_replay_test.py": 20, "extend_task_test.py": 14, "scalar_math_test.py": 11,
    "online_test.py": 15, "render_test.py": 12, "repo_test.py": 11, "envs_custom_rewards_test.py": 10,
    "orbax_io_test.py": 9, "official_format_test.py": 7, "checkpoint_reader_test.py": 7, "orbax_integrity_test.py": 5,
    "entry_points_test.py": 4, "plots_test.py": 3, "reader_safety_test.py": 3, "runs_test.py": 1, "config_test.py": 0,
}


def pytest_collection_modifyitems(config, items):
    longest = max(FILE_SECONDS.values()) + 1
    items.sort(key=lambda it: -FILE_SECONDS.get(os.path.basename(str(it.path)), longest))  # stable: in-file order kept
