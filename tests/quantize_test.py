"""Quantization: per-channel int8 accuracy, sizes, round trips, corrupt files, the report CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import CheckpointError, quant_report, quantize

from conftest import FP16_CKPT, INT8_CKPT, MODEL_OUTPUTS, REPO


@pytest.fixture(scope="module")
def ref_batch():
    ref = json.load(open(MODEL_OUTPUTS))
    obs = np.concatenate([np.asarray(r["obs"], np.float32) for r in ref.values()])
    task = np.concatenate([[r["task_index"]] * 8 for r in ref.values()]).astype(np.int32)
    act = np.concatenate([np.asarray(r["action"], np.float32) for r in ref.values()])
    return obs, task, act


def _policy_gap(agent_params, base_params, cfg, batch):
    a = quant_report.model_outputs(cfg, base_params, *batch)["policy"]
    b = quant_report.model_outputs(cfg, agent_params, *batch)["policy"]
    return float(np.abs(a - b).mean())


def test_int8_per_channel_error_below_one_percent(released_agent):
    for path in quantize.kernel_paths(released_agent.params):
        w = quantize._get_path(released_agent.params, path)
        q = quantize.quantize_int8(w)
        assert q["qvalues"].dtype == np.int8 and q["qscale"].shape == w.shape[:-2] + w.shape[-1:]
        assert quantize.channel_rel_error(w, q).max() <= 0.01, path
    ens = quantize.convert(released_agent.params, "int8")["qs"]["ensemble"]["layer_1"]["dense"]["kernel"]
    assert ens["qscale"].shape == (2, 384)  # one scale per member and output channel


def test_int8_policy_agrees_and_td_mpc_opt_scheme_does_not(released_agent, ref_batch):
    cfg = released_agent.config
    base = jax.tree_util.tree_map(jnp.asarray, released_agent.params)
    ours = quantize.for_compute(quantize.convert(released_agent.params, "int8"))
    assert _policy_gap(ours, base, cfg, ref_batch) < 0.02
    # TD-MPC-Opt: per-tensor qint8 with scale 1.0, applied to the same weights...
    scale1 = jax.tree_util.tree_map(lambda x: jnp.clip(jnp.round(x), -128, 127), base)
    assert _policy_gap(scale1, base, cfg, ref_batch) > 0.02
    # ...and their released int8 file
    with pytest.warns(UserWarning):
        theirs = tdmpc_jax.load_checkpoint(INT8_CKPT)
    assert _policy_gap(jax.tree_util.tree_map(jnp.asarray, theirs.params), base, cfg, ref_batch) > 0.02


def test_sizes_on_disk(tmp_path, released_agent):
    size = {}
    for fmt in ("fp32", "fp16", "int8", "mixed"):
        d = released_agent.save(tmp_path / fmt, fmt=fmt, keep_fp16=[("encoder", "layer_0", "dense", "kernel")])
        size[fmt] = quant_report.dir_bytes(d)
    assert size["fp16"] <= 0.52 * size["fp32"]
    assert size["int8"] <= 0.30 * size["fp32"]
    assert size["mixed"] <= 0.30 * size["fp32"]


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8", "mixed"])
def test_roundtrip_restores_the_format(tmp_path, released_agent, fmt):
    keep = [("pi_head", "layer_2", "kernel")]
    d = released_agent.save(tmp_path / fmt, fmt=fmt, keep_fp16=keep)
    b = tdmpc_jax.load_checkpoint(d)
    assert b.metadata["param_format"] == fmt
    want = quantize.dequantize(quantize.convert(released_agent.params, fmt, keep))
    for x, y in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), y)
    if fmt == "mixed":
        stored = quantize.convert(released_agent.params, fmt, keep)
        assert stored["pi_head"]["layer_2"]["kernel"].dtype == np.float16
        assert quantize.is_quantized(stored["dynamics"]["layer_1"]["dense"]["kernel"])
        assert stored["dynamics"]["layer_1"]["ln"]["scale"].dtype == np.float16


def test_bf16_compute_mode_runs_bf16_matmuls(released_agent, ref_batch):
    p = quantize.for_compute(released_agent.params, "bf16")
    assert p["dynamics"]["layer_1"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert p["dynamics"]["layer_1"]["ln"]["scale"].dtype == jnp.float32
    gap = _policy_gap(p, jax.tree_util.tree_map(jnp.asarray, released_agent.params), released_agent.config,
                      ref_batch)
    assert 0 < gap < 0.02


def test_mixed_keeps_the_most_sensitive_kernels():
    sens = {("a",): 5.0, ("b",): 3.0, ("c",): 1.0, ("d",): 1.0}
    assert quantize.choose_fp16_kernels(sens, 0.5) == [("a",)]
    assert quantize.choose_fp16_kernels(sens, 0.8) == [("a",), ("b",)]


def _corrupt(d, mutate):
    import orbax.checkpoint as ocp
    from tdmpc_jax.checkpoints import orbax_io
    _, ck = orbax_io._checkpointer()
    state = ck.restore(d, ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    mutate(state)
    meta = orbax_io.read_metadata(d)
    import shutil
    shutil.rmtree(d)
    ck.save(d, ocp.args.Composite(state=ocp.args.PyTreeSave(state), metadata=ocp.args.JsonSave(meta)))


def test_corrupt_int8_scales_are_an_error_not_zeros(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "q", fmt="int8")
    k = ("params", "reward_head", "layer_1", "dense", "kernel")

    def zero_scales(state):
        leaf = quantize._get_path(state, k)
        leaf["qscale"] = np.zeros_like(leaf["qscale"])
    _corrupt(d, zero_scales)
    with pytest.raises(CheckpointError, match="non-positive or non-finite scales"):
        tdmpc_jax.load_checkpoint(d)


def test_int8_values_stored_as_float_are_rejected(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "q", fmt="int8")

    def floaty(state):
        leaf = quantize._get_path(state, ("params", "pi_head", "layer_1", "dense", "kernel"))
        leaf["qvalues"] = leaf["qvalues"].astype(np.float32)
    _corrupt(d, floaty)
    with pytest.raises(CheckpointError, match="expected int8"):
        tdmpc_jax.load_checkpoint(d)


def test_quantize_cli_report(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "quantize.py"), f"--checkpoint={FP16_CKPT}",
                        "--formats=fp16,int8,mixed", f"--output={out}", "--tasks=cartpole-balance,pendulum-spin",
                        "--calib_steps=10", "--latency=false", "--evaluate", "--episodes=1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.load(open(out / "report.json"))
    assert set(rep["variants"]) == {"fp32", "fp16", "int8", "mixed"}
    assert rep["variants"]["fp32"]["errors"]["q"]["max"] == 0.0
    assert rep["variants"]["int8"]["errors"]["q"]["max"] > 0.0
    assert "eval" in rep["variants"]["int8"] and rep["mixed_fp16_kernels"]
    assert (out / "report.png").stat().st_size > 10_000 and "| int8 |" in (out / "report.md").read_text()
    assert tdmpc_jax.load_checkpoint(out / "int8").metadata["param_format"] == "int8"
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "quantize.py"), f"--checkpoint={FP16_CKPT}",
                        "--formats=int4", f"--output={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "unknown formats ['int4']" in r.stderr
