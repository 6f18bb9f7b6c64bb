"""A new storage format added from this file alone (no package edit): a toy per-output-channel int4 with a
layout of its own, registered for the test only, then converted, saved and loaded through the normal
checkpoint path, run (world-model queries and MPPI), and written by experiments/quantize.py."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import CheckpointError, networks, planner, quantize
from tdmpc_jax.agent import Agent
from tdmpc_jax.config import ModelConfig

from conftest import FP16_CKPT, REPO


def _is_int4(x):
    return isinstance(x, dict) and set(x) == {"q4", "s4"}


def _encode(path, w, sensitive):
    """Kernels: symmetric int4 per output channel (values in int8 containers); the rest fp32."""
    if not quantize.is_kernel(path, w):
        return w
    amax = np.abs(w).max(axis=-2)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    return {"q4": np.clip(np.rint(w / scale[..., None, :]), -7, 7).astype(np.int8), "s4": scale}


def _decode(x):
    if _is_int4(x):
        return x["q4"].astype(jnp.float32) * x["s4"][..., None, :]
    return x.astype(jnp.float32)


def _validate(name, x):
    if _is_int4(x):
        q, s = np.asarray(x["q4"]), np.asarray(x["s4"])
        if q.dtype != np.int8 or np.abs(q.astype(np.int16)).max() > 7:
            raise ValueError(f"{name} q4 is not int4 in int8 containers")
        if not (np.all(np.isfinite(s)) and np.all(s > 0)):
            raise ValueError(f"{name} has non-positive or non-finite int4 scales")
    elif not np.all(np.isfinite(np.asarray(x, np.float32))):
        raise ValueError(f"{name} contains NaN or Inf")


INT4 = quantize.Format("int4", "toy: int4 kernels per output channel", 0.5, _encode, decode=_decode,
                       is_stored=_is_int4, validate=_validate, metadata=lambda keep: {"int4_levels": 15})


@pytest.fixture
def int4():
    before = dict(quantize.FORMATS)
    with quantize.registered(INT4):
        yield INT4
    assert dict(quantize.FORMATS) == before  # nothing leaks into other tests


@pytest.fixture(scope="module")
def small_agent():
    cfg = ModelConfig(obs_dim=5, action_dim=2, latent_dim=16, enc_dim=24, mlp_dim=32, num_enc_layers=2, num_q=2,
                      task_dim=8, tasks=("a", "b", "c"), action_dims=(2, 1, 2), obs_dims=(5, 3, 5),
                      episode_lengths=(500, 500, 100), dropout=0.0)

    @jax.jit
    def init(key):
        params, target = networks.init_params(cfg, key)
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]  # non-trivial heads
        return jax.tree_util.tree_unflatten(tree, noisy), target
    params, target = init(jax.random.PRNGKey(0))
    np_ = lambda t: jax.tree_util.tree_map(np.asarray, t)
    return Agent(cfg, np_(params), np_(target))


def test_new_format_saves_loads_and_runs(tmp_path, int4, small_agent):
    a = small_agent
    stored = quantize.convert(a.params, "int4")
    k = stored["dynamics"]["layer_0"]["dense"]["kernel"]
    assert _is_int4(k) and k["q4"].dtype == np.int8 and np.abs(k["q4"]).max() <= 7
    assert stored["dynamics"]["layer_0"]["dense"]["bias"].dtype == np.float32

    d = a.save(tmp_path / "q", fmt="int4")
    b = tdmpc_jax.load_checkpoint(d)
    assert b.metadata["param_format"] == "int4" and b.metadata["int4_levels"] == 15
    want = quantize.dequantize(stored, "int4")
    for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(b.params)):
        assert y.dtype == np.float32, p
        np.testing.assert_array_equal(np.asarray(x), y)
    for path in quantize.kernel_paths(a.params):  # int4 error: at most half a step (max / 14) per channel
        w = np.asarray(quantize._get_path(a.params, path))
        err = np.abs(quantize._get_path(b.params, path) - w).max(axis=-2)
        assert np.all(err <= np.abs(w).max(axis=-2) / 14 + 1e-6), path

    obs = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    act = np.tanh(np.random.default_rng(1).normal(size=(4, 2))).astype(np.float32)
    z, z_ref = b.encode(obs, 2), a.encode(obs, 2)
    assert np.all(np.isfinite(z)) and 0 < np.abs(z - z_ref).max() < 0.5
    for got in (b.next(z, act, 2), b.reward(z, act, 2), b.pi(z, 2)[0], b.q(z, act, 2)):
        assert np.all(np.isfinite(np.asarray(got)))
    pcfg = planner.PlannerConfig(horizon=2, iterations=2, num_samples=32, num_elites=4, num_pi_trajs=4)
    params = jax.tree_util.tree_map(jnp.asarray, b.params)
    action, _ = planner.act_one(b.config, pcfg, params, jnp.asarray(obs[0]), jnp.int32(0),
                                planner.init_state(b.config, pcfg), jnp.bool_(True), jax.random.PRNGKey(0))
    assert action.shape == (2,) and np.all(np.isfinite(action)) and np.all(np.abs(np.asarray(action)) <= 1)
    c = tdmpc_jax.load_checkpoint(d, compute="bf16")  # compute modes apply to any format
    assert c.params["dynamics"]["layer_0"]["dense"]["kernel"].dtype == jnp.bfloat16


def test_the_format_checks_its_stored_leaves_on_load(tmp_path, int4, small_agent):
    bad = quantize.convert(small_agent.params, "int4")
    bad["reward_head"]["layer_0"]["dense"]["kernel"]["s4"][:] = 0
    with pytest.raises(ValueError, match="reward_head/layer_0/dense/kernel has non-positive or non-finite int4"):
        quantize.validate_storage(bad, "state", "int4")
    from tdmpc_jax.checkpoints import orbax_io
    d = orbax_io.save_orbax(tmp_path / "bad", bad, quantize.convert(small_agent.target_qs, "int4"),
                            small_agent.config, param_format="int4")
    with pytest.raises(CheckpointError, match="corrupt int4 parameters: state: params/reward_head"):
        tdmpc_jax.load_checkpoint(d)


def test_registration_is_scoped_and_unknown_formats_are_errors(tmp_path, small_agent):
    with quantize.registered(INT4):
        d = small_agent.save(tmp_path / "q", fmt="int4")
        with pytest.raises(ValueError, match="already registered"):
            quantize.register_format(quantize.Format("int4", "another", 0.5, _encode))
    assert "int4" not in quantize.FORMATS and list(quantize.FORMATS)[:5] == ["fp32", "fp16", "bf16", "int8", "mixed"]
    with pytest.raises(CheckpointError, match=r"param_format: unknown format 'int4' .*register the format"):
        tdmpc_jax.load_checkpoint(d)
    with pytest.raises(ValueError, match="unknown format 'int4'"):
        small_agent.save(tmp_path / "r", fmt="int4")
    assert not (tmp_path / "r").exists()


def test_quantize_cli_writes_and_reports_the_new_format(tmp_path, int4):
    """experiments/quantize.py takes its --formats choices and sizes from the registry."""
    out, script = tmp_path / "rep", os.path.join(REPO, "experiments", "quantize.py")
    argv = [script, f"--checkpoint={FP16_CKPT}", "--formats=int4", f"--output={out}", "--tasks=cartpole-balance",
            "--calib_steps=2", "--latency=false"]
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import extend_format_test as t; "
            "from tdmpc_jax import quantize; quantize.register_format(t.INT4); sys.argv = sys.argv[2:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "disable"))
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)] + argv, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(out / "report.json"))
    assert set(rep["variants"]) == {"fp32", "int4"} and not rep["mixed_fp16_kernels"]
    v = rep["variants"]["int4"]
    assert v["bytes_per_param"] == 0.5 and v["errors"]["q"]["max"] > 0
    assert v["param_bytes"] < 0.3 * rep["variants"]["fp32"]["param_bytes"]  # int8 containers + fp32 scales
    assert tdmpc_jax.load_checkpoint(out / "int4").metadata["param_format"] == "int4"
