"""Official .pt checkpoints: fidelity against the official code's outputs, and bad input."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import CheckpointError
from tdmpc_jax.checkpoints import official
from tdmpc_jax.checkpoints.torch_reader import read_torch_file
from tdmpc_jax.checkpoints.torch_writer import write_torch_file

from conftest import FP16_CKPT, INT8_CKPT, MIXED_CKPT, MODEL_OUTPUTS

ATOL, RTOL = 1e-4, 1e-5


def _ref():
    with open(MODEL_OUTPUTS) as f:
        return json.load(f)


def test_released_checkpoint_reproduces_official_outputs(released_agent):
    agent = released_agent
    ref = _ref()
    assert len(ref) == 20
    for name, r in ref.items():
        task = r["task_index"]
        assert agent.config.tasks[task] == name
        obs = np.asarray(r["obs"], np.float32)
        act = np.asarray(r["action"], np.float32)
        z_ref = np.asarray(r["z"], np.float32)
        np.testing.assert_allclose(agent.encode(obs, task), z_ref, atol=ATOL, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(agent.next(z_ref, act, task), r["next_z"], atol=ATOL, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(agent.reward(z_ref, act, task), r["reward"], atol=ATOL, rtol=RTOL, err_msg=name)
        mean, log_std = agent.pi(z_ref, task)
        np.testing.assert_allclose(mean, r["pi_mean"], atol=ATOL, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(log_std, r["pi_log_std"], atol=ATOL, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(agent.q(z_ref, act, task), r["q_values"], atol=ATOL, rtol=RTOL, err_msg=name)


def test_task_given_by_name(released_agent):
    r = _ref()["cup-catch"]
    z = np.asarray(r["z"], np.float32)
    np.testing.assert_allclose(released_agent.reward(z, np.asarray(r["action"], np.float32), "cup-catch"),
                               r["reward"], atol=ATOL, rtol=RTOL)


def test_inferred_architecture_of_released_checkpoint(released_agent):
    c = released_agent.config
    assert (c.model_size, c.task_set, c.latent_dim, c.task_dim, c.num_q, c.obs_dim, c.action_dim) == \
        (1, "mt30", 128, 96, 2, 24, 6)
    n = released_agent.num_params()
    assert n["learnable"] == 1_426_427 and n["target"] == 553_930
    assert released_agent.metadata["source_format"] == "old"


def test_int8_checkpoint_is_dequantized_with_a_warning():
    with pytest.warns(UserWarning, match=r"9\d\.\d% of their values are exactly 0"):
        agent = tdmpc_jax.load_checkpoint(INT8_CKPT)
    frac = agent.metadata["quantized_zero_fraction"]
    assert 0.90 < frac < 0.92
    emb = np.asarray(agent.params["task_emb"]["embedding"])
    assert np.all(emb == np.round(emb))  # scale 1.0: integer values


def test_mixed_checkpoint_only_q_ensembles_quantized(released_agent):
    with pytest.warns(UserWarning, match="20 quantized tensors"):
        agent = tdmpc_jax.load_checkpoint(MIXED_CKPT)
    np.testing.assert_array_equal(agent.params["encoder"]["layer_0"]["dense"]["kernel"],
                                  released_agent.params["encoder"]["layer_0"]["dense"]["kernel"])
    q = np.asarray(agent.params["qs"]["ensemble"]["layer_0"]["dense"]["kernel"])
    assert np.all(q == np.round(q))


def _sd():
    return read_torch_file(FP16_CKPT)["model"]


def test_old_and_new_format_give_identical_params(tmp_path, released_agent):
    a = released_agent
    new = official.params_to_state_dict(a.params, a.target_qs, a.config, "new", dtype=np.float16)
    assert len(new) == 80 and list(new)[:3] == ["_action_masks", "log_std_min", "log_std_dif"]
    assert new["log_std_min"].dtype == np.int64 and int(new["log_std_dif"]) == 12
    path = write_torch_file(tmp_path / "new.pt", {"model": new})
    b = tdmpc_jax.load_checkpoint(path)
    assert b.metadata["source_format"] == "new"
    _assert_same(a, b)
    # and a bare state dict (no {"model": ...} wrapper) in the old format
    old = official.params_to_state_dict(a.params, a.target_qs, a.config, "old", dtype=np.float16)
    assert len(old) == 61
    c = tdmpc_jax.load_checkpoint(write_torch_file(tmp_path / "old.pt", old))
    _assert_same(a, c)


def _assert_same(a, b):
    import jax
    assert a.config == b.config
    la = jax.tree_util.tree_leaves_with_path((a.params, a.target_qs))
    lb = jax.tree_util.tree_leaves_with_path((b.params, b.target_qs))
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(k))


def test_new_format_action_masks_checked(tmp_path, released_agent):
    a = released_agent
    sd = official.params_to_state_dict(a.params, a.target_qs, a.config, "new")
    sd["_action_masks"] = np.ones_like(sd["_action_masks"])
    with pytest.raises(CheckpointError, match="_action_masks disagree"):
        tdmpc_jax.load_checkpoint(write_torch_file(tmp_path / "m.pt", {"model": sd}))


# --- bad input ---------------------------------------------------------------------------------

def test_missing_file():
    with pytest.raises(CheckpointError, match="no such file"):
        tdmpc_jax.load_checkpoint("/nonexistent/model.pt")


def test_truncated_file(tmp_path):
    data = open(FP16_CKPT, "rb").read()
    p = tmp_path / "trunc.pt"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: .*(truncated|corrupt)"):
        tdmpc_jax.load_checkpoint(p)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        tdmpc_jax.load_checkpoint(p)


def test_plain_garbage_file(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        tdmpc_jax.load_checkpoint(p)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_foreign_callable_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": {"_task_emb.weight": _Evil(marker)}}, protocol=protocol)
    p = tmp_path / "evil.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="refuses to load global '(posix|os)"):
        tdmpc_jax.load_checkpoint(p)
    assert not marker.exists()
    # sanity: the payload really would run under an unrestricted unpickler
    pickle.loads(payload)
    assert marker.exists()


def test_missing_key(tmp_path):
    sd = dict(_sd())
    del sd["_reward.1.ln.bias"]
    with pytest.raises(CheckpointError, match=r"missing\.pt: missing key '_reward\.1\.ln\.bias'"):
        tdmpc_jax.load_checkpoint(write_torch_file(tmp_path / "missing.pt", {"model": sd}))


def test_wrong_shape(tmp_path):
    sd = dict(_sd())
    sd["_pi.1.weight"] = np.zeros((384, 383), np.float16)
    with pytest.raises(CheckpointError, match=r"_pi\.1\.weight has shape \(384, 383\), expected \(384, 384\)"):
        tdmpc_jax.load_checkpoint(write_torch_file(tmp_path / "shape.pt", {"model": sd}))


def test_nan_weights_rejected(tmp_path):
    sd = dict(_sd())
    w = sd["_dynamics.0.bias"].copy()
    w[3] = np.nan
    sd["_dynamics.0.bias"] = w
    with pytest.raises(CheckpointError, match="_dynamics.0.bias contains NaN"):
        tdmpc_jax.load_checkpoint(write_torch_file(tmp_path / "nan.pt", {"model": sd}))


def test_not_a_world_model(tmp_path):
    p = write_torch_file(tmp_path / "other.pt", {"model": {"fc.weight": np.zeros((2, 2), np.float32)}})
    with pytest.raises(CheckpointError, match="not a TD-MPC2 world-model state dict"):
        tdmpc_jax.load_checkpoint(p)


def test_storage_record_size_mismatch(tmp_path):
    src = tmp_path / "ok.pt"
    write_torch_file(src, {"model": {"x": np.zeros(4, np.float32)}})
    bad = tmp_path / "short.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(bad, "w") as zo:
        for n in zi.namelist():
            zo.writestr(n, zi.read(n)[:-4] if n.endswith("data/0") else zi.read(n))
    with pytest.raises(CheckpointError, match="holds 12 bytes"):
        read_torch_file(bad)
