"""Orbax checkpoints carry a SHA-256 per array: flipped bytes in the array data are a one-line error
naming the array (they used to load silently), and checkpoints written before checksums still load."""
import json
import os

import jax
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import CheckpointError, train
from tdmpc_jax.checkpoints import orbax_io
from tdmpc_jax.config import TrainConfig

from conftest import REPO


def _find_array(directory, arr):
    """(file, offset) of the raw bytes of `arr` inside the Orbax data files under `directory`."""
    raw = np.ascontiguousarray(arr).tobytes()
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            data = open(path, "rb").read()
            off = data.find(raw)
            if off >= 0:
                return path, off
    raise AssertionError("array bytes not found in the checkpoint's data files")


def _flip(path, offsets):
    data = bytearray(open(path, "rb").read())
    for off in offsets:
        data[off] ^= 0x5A
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("nbytes", [700, 3])
def test_flipped_bytes_in_array_data_are_an_error_naming_the_array(tmp_path, released_agent, nbytes):
    d = released_agent.save(tmp_path / "ckpt")
    kernel = np.asarray(released_agent.params["pi_head"]["layer_1"]["dense"]["kernel"], np.float32)
    path, off = _find_array(os.path.join(d, "state"), kernel)
    rng = np.random.default_rng(nbytes)
    _flip(path, off + rng.choice(kernel.nbytes, nbytes, replace=False))
    with pytest.raises(CheckpointError, match=r"ckpt: array params/pi_head/layer_1/dense/kernel is corrupt") as e:
        tdmpc_jax.load_checkpoint(d)
    assert "\n" not in str(e.value)


def test_every_array_has_a_checksum(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "ckpt", fmt="int8")
    sums = orbax_io.read_metadata(d)[orbax_io.CHECKSUM_KEY]
    _, _, _, meta = orbax_io.load_orbax(d)
    assert orbax_io.CHECKSUM_KEY not in meta  # not carried into Agent.metadata (a re-save recomputes them)
    leaves = jax.tree_util.tree_leaves({"params": released_agent.params, "target_qs": released_agent.target_qs})
    assert len(sums) > len(leaves)  # int8 kernels are stored as values + scales
    assert "params/encoder/layer_0/dense/kernel/qvalues" in sums


def test_checkpoint_without_checksums_loads_unverified(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "old")
    path = os.path.join(d, "metadata", "metadata")
    meta = json.load(open(path))
    del meta[orbax_io.CHECKSUM_KEY]
    json.dump(meta, open(path, "w"))
    b = tdmpc_jax.load_checkpoint(d)
    for x, y in zip(jax.tree_util.tree_leaves(released_agent.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_committed_teacher_loads_and_verifies():
    d = os.path.join(REPO, "checkpoints", "teacher-mt4")
    params, target, cfg, meta = orbax_io.load_orbax(d)
    assert meta["trained_steps"] == 32000 and cfg.tasks[0] == "cartpole-balance"
    if orbax_io.CHECKSUM_KEY in orbax_io.read_metadata(d):  # regenerated with checksums: they were checked
        assert len(orbax_io.read_metadata(d)[orbax_io.CHECKSUM_KEY]) == len(
            jax.tree_util.tree_leaves({"params": params, "target_qs": target}))


def test_mismatched_checksum_sets_are_errors(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "ckpt")
    path = os.path.join(d, "metadata", "metadata")
    meta = json.load(open(path))
    sums = meta[orbax_io.CHECKSUM_KEY]
    sums["params/not_there"] = sums.pop("params/encoder/layer_0/dense/kernel")
    json.dump(meta, open(path, "w"))
    with pytest.raises(CheckpointError, match="array params/encoder/layer_0/dense/kernel has no checksum"):
        tdmpc_jax.load_checkpoint(d)


def test_train_state_corruption_is_an_error_naming_the_array(tmp_path):
    from losses_test import small_cfg
    from tdmpc_jax.offline import load_state, save_state
    cfg, tcfg = small_cfg(), TrainConfig(batch_size=8)
    state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
    out = str(tmp_path / "run")
    os.makedirs(out)
    save_state(out, state, cfg, tcfg)
    got, meta = load_state(out, state)
    assert meta["step"] == 0
    kernel = np.asarray(state.params["dynamics"]["layer_0"]["dense"]["kernel"])
    path, off = _find_array(os.path.join(out, "train_state"), kernel)
    _flip(path, [off + 5, off + 77, off + 301])
    with pytest.raises(CheckpointError, match=r"train_state: array params/dynamics/layer_0/dense/kernel is corrupt"):
        load_state(out, state)
