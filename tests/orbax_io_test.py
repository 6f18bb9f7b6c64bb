"""Orbax round trip (.pt -> Orbax -> load gives identical params) and corrupt/mismatched dirs."""
import json
import os

import jax
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import CheckpointError
from tdmpc_jax.checkpoints import orbax_io


def test_roundtrip_identical(tmp_path, released_agent):
    out = released_agent.save(tmp_path / "ckpt")
    b = tdmpc_jax.load_checkpoint(out)
    assert b.config == released_agent.config
    la = jax.tree_util.tree_leaves_with_path((released_agent.params, released_agent.target_qs))
    lb = jax.tree_util.tree_leaves_with_path((b.params, b.target_qs))
    assert len(la) == len(lb) == 61
    for (k, x), (k2, y) in zip(la, lb):
        assert k == k2
        assert np.asarray(y).dtype == np.float32
        np.testing.assert_array_equal(x, y)
    z = b.encode(np.zeros((2, 24), np.float32), 3)
    np.testing.assert_array_equal(z, released_agent.encode(np.zeros((2, 24), np.float32), 3))


def test_relative_path(tmp_path, released_agent, monkeypatch):
    monkeypatch.chdir(tmp_path)
    released_agent.save("rel/ckpt")
    assert tdmpc_jax.load_checkpoint("rel/ckpt").num_params()["learnable"] == 1_426_427


def test_save_replaces_existing_atomically(tmp_path, released_agent):
    d = tmp_path / "ckpt"
    released_agent.save(d)
    released_agent.save(d)
    assert tdmpc_jax.load_checkpoint(d).num_params()["learnable"] == 1_426_427
    assert sorted(p for p in os.listdir(tmp_path)) == ["ckpt"]  # no temp leftovers


def test_directory_without_metadata(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a tdmpc_jax checkpoint"):
        tdmpc_jax.load_checkpoint(tmp_path / "empty")


def test_corrupt_metadata(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "ckpt")
    with open(os.path.join(d, "metadata", "metadata"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        tdmpc_jax.load_checkpoint(d)


def test_config_that_does_not_match_the_stored_params(tmp_path, released_agent):
    d = released_agent.save(tmp_path / "ckpt")
    path = os.path.join(d, "metadata", "metadata")
    meta = json.load(open(path))
    meta["config"]["mlp_dim"] = 512
    json.dump(meta, open(path, "w"))
    with pytest.raises(CheckpointError, match=r"\['dynamics'\].* has shape \(384,\), expected \(512,\)"):
        tdmpc_jax.load_checkpoint(d)


def test_deleted_array_data(tmp_path, released_agent):
    import shutil
    d = released_agent.save(tmp_path / "ckpt")
    shutil.rmtree(os.path.join(d, "state"))
    with pytest.raises(CheckpointError, match="cannot restore state"):
        tdmpc_jax.load_checkpoint(d)


def test_unwritable_output(tmp_path, released_agent):
    if os.geteuid() == 0:
        target = "/proc/tdmpc_jax_ckpt"  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "ckpt"
    with pytest.raises((CheckpointError, OSError)):
        orbax_io.save_orbax(target, released_agent.params, released_agent.target_qs, released_agent.config)
