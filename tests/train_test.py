"""Training: data-parallel step == one device, exact resume, NaN stop, learning with a teacher, bad input."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import train
from tdmpc_jax.config import TrainConfig
from tdmpc_jax.data import Dataset, DatasetError, DatasetWriter
from tdmpc_jax.data.collect import collect
from tdmpc_jax.losses import Batch
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.offline import RunConfig, load_state, train_offline
from tdmpc_jax.planner import PlannerConfig

from conftest import FP16_CKPT, REPO
from losses_test import small_cfg

TASKS = ("cartpole-balance", "pendulum-spin")


def mt30_small(**kw):
    from tdmpc_jax.config import make_model_config
    return make_model_config(1, "mt30", enc_dim=64, mlp_dim=64, latent_dim=32, task_dim=16, model_size=None, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, released_agent):
    path = tmp_path_factory.mktemp("data") / "ds"
    return collect(released_agent, ",".join(TASKS), 2, path, PlannerConfig(mpc=False), progress=False)


def _batch(cfg, seed=0, B=8):
    rng = np.random.RandomState(seed)
    return Batch(rng.randn(4, B, cfg.obs_dim).astype(np.float32),
                 rng.uniform(-1, 1, (3, B, cfg.action_dim)).astype(np.float32),
                 rng.uniform(0, 2, (3, B)).astype(np.float32), rng.randint(0, cfg.num_tasks, B).astype(np.int32))


def test_two_devices_equal_one_device():
    assert len(jax.devices()) >= 2, "tests run with XLA_FLAGS=--xla_force_host_platform_device_count=2"
    cfg, tcfg = small_cfg(dropout=0.01), TrainConfig(batch_size=8)
    outs = []
    for devs in (jax.devices()[:1], jax.devices()[:2]):
        state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
        step = train.make_train_step(cfg, tcfg, mesh=train.make_mesh(devs))
        for k in range(3):
            state, m = step(state, _batch(cfg, k), jax.random.PRNGKey(k))
        outs.append((state, m))
    (s1, m1), (s2, m2) = outs
    assert len(s2.params["encoder"]["layer_0"]["dense"]["kernel"].sharding.device_set) == 2
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(m1["total_loss"], m2["total_loss"], rtol=1e-5)


def test_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match="not divisible"):
        train.make_train_step(small_cfg(), TrainConfig(batch_size=7), mesh=train.make_mesh(jax.devices()[:2]))


def test_student_learns_and_moves_towards_teacher(dataset, released_agent, tmp_path):
    cfg = mt30_small()
    first_last = {}
    for coef in (0.45, 0.0):
        tcfg = TrainConfig(batch_size=64, distill_coef=coef)
        run = RunConfig(steps=200, log_every=25, checkpoint_every=200, progress=False)
        # the MSE to the teacher is logged in both runs (coef 0: as a probe, not in the loss)
        probe = TrainConfig(batch_size=64, distill_coef=coef if coef else 1e-12)
        train_offline(cfg, probe if coef == 0 else tcfg, dataset, str(tmp_path / str(coef)), run, released_agent)
        rows = [json.loads(l) for l in open(tmp_path / str(coef) / "metrics.jsonl")]
        first_last[coef] = (rows[0], rows[-1])
    first, last = first_last[0.45]
    for k in ("consistency_loss", "reward_loss", "value_loss", "distill_reward_mse"):
        assert last[k] < first[k], k
    distilled = last["distill_reward_mse"]
    scratch = first_last[0.0][1]["distill_reward_mse"]
    assert distilled < 0.5 * scratch  # with coef 0 the student's rewards do not track the teacher's
    assert (tmp_path / "0.45" / "curve.png").exists() and (tmp_path / "0.45" / "metrics.csv").exists()
    agent = tdmpc_jax.load_checkpoint(tmp_path / "0.45" / "agent")
    assert agent.config == cfg


def test_resume_after_kill_is_exact(dataset, tmp_path):
    cfg, tcfg = mt30_small(), TrainConfig(batch_size=16)
    _, full = train_offline(cfg, tcfg, dataset, str(tmp_path / "full"),
                            RunConfig(steps=6, log_every=3, checkpoint_every=3, progress=False))
    # "killed" after its checkpoint at step 3 (the run stops there), then started again to 6
    train_offline(cfg, tcfg, dataset, str(tmp_path / "cut"), RunConfig(steps=3, log_every=3, checkpoint_every=3,
                                                                       progress=False))
    _, resumed = train_offline(cfg, tcfg, dataset, str(tmp_path / "cut"),
                               RunConfig(steps=6, log_every=3, checkpoint_every=3, progress=False))
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [3, 6]


def test_weight_averaging_is_the_mean_of_the_snapshots_and_resumes_exactly(dataset, tmp_path):
    cfg, tcfg = mt30_small(), TrainConfig(batch_size=16)
    quiet = dict(log_every=3, checkpoint_every=3, progress=False)
    # the plain run, stopped after each snapshot update: its weights at updates 2, 4 and 6
    snaps = [train_offline(cfg, tcfg, dataset, str(tmp_path / "plain"), RunConfig(steps=s, **quiet))[0]
             for s in (2, 4, 6)]
    avg = dict(average_from=2, average_every=2)
    agent, state = train_offline(cfg, tcfg, dataset, str(tmp_path / "avg"), RunConfig(steps=6, **quiet, **avg))
    assert agent.metadata["averaged_snapshots"] == 3
    for part in ("params", "target_qs"):
        want = jax.tree_util.tree_map(lambda *x: (x[0] + x[1] + x[2]) / np.float32(3), *[getattr(a, part) for a in snaps])
        for a, b in zip(jax.tree_util.tree_leaves(getattr(agent, part)), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(agent.params["pi_head"]["layer_2"]["kernel"], snaps[-1].params["pi_head"]["layer_2"]["kernel"])
    # averaging does not touch training: the train state holds the plain run's last weights
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(snaps[-1].params)):
        np.testing.assert_array_equal(a, b)
    # killed after its checkpoint at 3 (one snapshot summed), resumed to 6: the same averaged agent
    train_offline(cfg, tcfg, dataset, str(tmp_path / "cut"), RunConfig(steps=3, **quiet, **avg))
    resumed, _ = train_offline(cfg, tcfg, dataset, str(tmp_path / "cut"), RunConfig(steps=6, **quiet, **avg))
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(agent.params)):
        np.testing.assert_array_equal(a, b)
    assert tdmpc_jax.load_checkpoint(tmp_path / "avg" / "agent").metadata["averaged_snapshots"] == 3
    # another averaging on resume is refused, and so is averaging a run that had none
    for out, other in (("cut", dict(average_from=3, average_every=1)), ("plain", avg)):
        with pytest.raises(CheckpointError, match="weight averaging"):
            train_offline(cfg, tcfg, dataset, str(tmp_path / out), RunConfig(steps=8, **quiet, **other))


def _rows(path):
    return [json.loads(l) for l in open(path / "metrics.jsonl")]


def test_blocks_equal_single_updates_and_resume_exactly(dataset, released_agent, tmp_path):
    """RunConfig.block: updates in scanned blocks that stop wherever the host needs the state give the
    single-update run's weights, logs, snapshots and checkpoints; a resumed block run is bitwise the
    uninterrupted one."""
    cfg = mt30_small()
    quiet = dict(log_every=4, checkpoint_every=4, progress=False, average_from=3, average_every=2)
    # stops at 3 (snapshot), 4 (log), 5, 7 (snapshots), 8: blocks of 2 over 0-2 and 5-7, single steps elsewhere
    assert [RunConfig(steps=8, block=2, **quiet).next_stop(k) for k in (0, 2, 3, 4, 5, 7)] == [3, 3, 4, 5, 7, 8]
    for name, tcfg, teacher in (("plain", TrainConfig(batch_size=16), None),
                                ("teacher", TrainConfig(batch_size=16, distill_coef=0.4, distill_policy_coef=1.0),
                                 released_agent)):
        one, s1 = train_offline(cfg, tcfg, dataset, str(tmp_path / name / "one"), RunConfig(steps=8, **quiet), teacher)
        blk, s2 = train_offline(cfg, tcfg, dataset, str(tmp_path / name / "blk"), RunConfig(steps=8, block=2, **quiet),
                                teacher)
        assert blk.metadata["averaged_snapshots"] == one.metadata["averaged_snapshots"] == 3
        for a, b in zip(jax.tree_util.tree_leaves((one.params, s1.params)), jax.tree_util.tree_leaves((blk.params, s2.params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        r1, r2 = _rows(tmp_path / name / "one"), _rows(tmp_path / name / "blk")
        assert [r["step"] for r in r1] == [r["step"] for r in r2] == [4, 8]
        for k in r1[-1]:
            if k not in ("step", "elapsed_s"):
                assert r2[-1][k] == pytest.approx(r1[-1][k], rel=1e-4, abs=1e-6), k
    # killed after its checkpoint at 4, resumed to 8, in blocks: bitwise the uninterrupted block run
    tcfg = TrainConfig(batch_size=16)
    train_offline(cfg, tcfg, dataset, str(tmp_path / "cut"), RunConfig(steps=4, block=2, **quiet))
    resumed, _ = train_offline(cfg, tcfg, dataset, str(tmp_path / "cut"), RunConfig(steps=8, block=2, **quiet))
    full = tdmpc_jax.load_checkpoint(tmp_path / "plain" / "blk" / "agent")
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="block must be >= 1"):
        RunConfig(block=0)


def test_average_window():
    from tdmpc_jax.offline import average_window
    assert average_window(3000, 1 / 3, 5) == dict(average_from=2000, average_every=250)
    assert average_window(3000, 0, 5) == dict(average_from=0, average_every=0)
    assert average_window(100, 0.5, 1) == dict(average_from=100, average_every=1)
    run = RunConfig(steps=3000, **average_window(3000, 1 / 3, 5))
    assert [run.snapshots(s) for s in (1999, 2000, 2249, 2250, 3000)] == [0, 1, 1, 2, 5]
    with pytest.raises(ValueError, match="do not fit"):
        average_window(4, 0.25, 5)
    with pytest.raises(ValueError, match="average_every >= 1"):
        RunConfig(average_from=5)


def test_nan_loss_stops_with_last_good_checkpoint(dataset, tmp_path):
    cfg = mt30_small()
    out = str(tmp_path / "nan")
    train_offline(cfg, TrainConfig(batch_size=16), dataset, out, RunConfig(steps=2, log_every=1, checkpoint_every=2,
                                                                          progress=False))
    with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 2\\)"):
        train_offline(cfg, TrainConfig(batch_size=16, lr=1e38), dataset, out,
                      RunConfig(steps=40, log_every=1, checkpoint_every=100, progress=False))
    like = train.init_train_state(cfg, TrainConfig(batch_size=16, lr=1e38), jax.random.PRNGKey(0))
    state, meta = load_state(out, like)
    assert meta["step"] == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))


def test_teacher_student_mismatch(dataset, released_agent, tmp_path):
    cfg = small_cfg()
    with pytest.raises(DatasetError, match="dims"):
        train_offline(cfg, TrainConfig(batch_size=8), dataset, str(tmp_path / "x"), RunConfig(steps=1))
    from tdmpc_jax.offline import check_teacher
    with pytest.raises(ValueError, match="different task sets"):
        check_teacher(small_cfg(), released_agent.config)


def test_dataset_roundtrip_sampling_and_bad_files(tmp_path):
    p = tmp_path / "d"
    with DatasetWriter(p, 4, 2, ["a", "b"]) as w:
        for e in range(3):
            T = 6 + e
            obs = np.arange(T * 3, dtype=np.float32).reshape(T, 3) + 100 * e
            act = np.full((T, 2), e, np.float32)
            act[0] = np.nan
            rew = np.arange(T, dtype=np.float32)
            rew[0] = np.nan
            w.add_episode(obs, act, rew, e % 2)
    ds = Dataset(p)
    assert (ds.num_episodes, ds.num_steps) == (3, 21)
    obs, act, rew, task = ds.sample(np.random.default_rng(0), 32, 3)
    assert obs.shape == (4, 32, 4) and act.shape == (3, 32, 2) and rew.shape == (3, 32)
    assert np.all(obs[:, :, 3] == 0)  # zero padded
    # slices stay inside one episode and follow the storage convention
    ep = (obs[0, :, 0] // 100).astype(int)
    np.testing.assert_array_equal(act[0, :, 0], ep)
    np.testing.assert_array_equal(task, ep % 2)
    np.testing.assert_array_equal(obs[1, :, 0] - obs[0, :, 0], 3)
    assert np.all(np.isfinite(rew)) and np.all(rew[1] == rew[0] + 1)
    # bad files
    with open(p / "reward.bin", "r+b") as f:
        f.seek(4 * 3)
        f.write(np.float32(np.nan).tobytes())
    with pytest.raises(DatasetError, match="NaN/Inf reward at step 3"):
        Dataset(p)
    os.truncate(p / "obs.bin", 10)
    with pytest.raises(DatasetError, match="obs.bin holds 10 bytes"):
        Dataset(p)
    with pytest.raises(DatasetError, match="not a dataset"):
        Dataset(tmp_path)
    with pytest.raises(ValueError, match="NaN/Inf outside the filler"):
        DatasetWriter(tmp_path / "e", 3, 1, ["a"]).add_episode(np.zeros((3, 3)), np.zeros((3, 1)),
                                                               np.array([0, np.nan, 1]), 0)


def test_official_chunk_import(tmp_path):
    from tdmpc_jax.checkpoints.torch_writer import write_torch_file
    from tdmpc_jax.data.official_import import import_chunks
    rng = np.random.RandomState(0)
    N, T = 3, 11
    chunk = {"obs": rng.randn(N, T, 24).astype(np.float32), "action": rng.uniform(-1, 1, (N, T, 6)).astype(np.float32),
             "reward": rng.uniform(0, 1, (N, T)).astype(np.float32), "task": np.repeat([[0], [5], [29]], T, 1).astype(np.int32)}
    chunk["action"][:, 0] = np.nan
    chunk["reward"][:, 0] = np.nan
    files = [write_torch_file(tmp_path / f"chunk_{i}.pt", chunk) for i in range(2)]
    from tdmpc_jax.config import MT30_TASKS
    ds = import_chunks(files, tmp_path / "mt30", MT30_TASKS, "mt30", progress=False)
    assert (ds.num_episodes, ds.num_steps) == (6, 66)
    np.testing.assert_array_equal(np.asarray(ds.arrays["obs"][11:22]), chunk["obs"][1])
    bad = dict(chunk, reward=chunk["reward"][:, :5])
    with pytest.raises(DatasetError, match="disagree"):
        import_chunks([write_torch_file(tmp_path / "bad.pt", bad)], tmp_path / "x", MT30_TASKS, progress=False)
    assert not (tmp_path / "x").exists()


def test_distill_cli_errors(tmp_path, dataset):
    script = os.path.join(REPO, "experiments", "distill.py")
    r = subprocess.run([sys.executable, script, f"--data={tmp_path / 'none'}", f"--output={tmp_path / 'o'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "not a dataset" in r.stderr
    r = subprocess.run([sys.executable, script, f"--data={dataset.path}", f"--output={tmp_path / 'o'}",
                        f"--teacher={FP16_CKPT}", "--student_size=5", "--task_set=mt80", "--steps=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "different task sets" in r.stderr


def test_distill_cli_runs_and_resumes(tmp_path, dataset):
    script = os.path.join(REPO, "experiments", "distill.py")
    args = [sys.executable, script, f"--data={dataset.path}", f"--output={tmp_path / 'run'}", f"--teacher={FP16_CKPT}",
            "--student_size=64,64,32", "--batch_size=16", "--log_every=2", "--checkpoint_every=2"]
    r = subprocess.run(args + ["--steps=2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(args + ["--steps=4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resuming from step 2" in r.stderr, r.stderr
    assert "updates/s" in r.stderr and "ETA" in r.stderr
    assert tdmpc_jax.load_checkpoint(tmp_path / "run" / "agent").metadata["trained_steps"] == 4


def test_two_processes_equal_one_device(tmp_path):
    """jax.distributed with 2 local CPU processes (gloo collectives) == one device, same global batch."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    out = tmp_path / "params.npz"
    procs = [subprocess.Popen([sys.executable, worker, f"127.0.0.1:{port}", "2", str(i), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    cfg, tcfg = small_cfg(dropout=0.01), TrainConfig(batch_size=8)
    state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
    step = train.make_train_step(cfg, tcfg, mesh=train.make_mesh(jax.devices()[:1]))
    for k in range(3):
        state, _ = step(state, _batch(cfg, k), jax.random.PRNGKey(k))
    got = np.load(out)
    want = jax.tree_util.tree_leaves(state.params)
    assert len(got.files) == len(want)
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, atol=2e-6, rtol=1e-5)


def test_tensordict_chunk_imports_without_torch(tmp_path):
    """tests/data/tensordict_chunk.pt: torch.save(TensorDict(...)) by torch 2.13 + tensordict (3 eps x 11)."""
    from tdmpc_jax.config import MT30_TASKS
    from tdmpc_jax.data.official_import import import_chunks, read_chunk
    path = os.path.join(os.path.dirname(__file__), "data", "tensordict_chunk.pt")
    c = read_chunk(path)
    assert c["obs"].shape == (3, 11, 24) and c["task"].dtype == np.int32 and np.isnan(c["reward"][:, 0]).all()
    ds = import_chunks([path], tmp_path / "td", MT30_TASKS, "mt30", progress=False)
    assert ds.num_episodes == 3 and sorted(set(np.asarray(ds.arrays["task"]).tolist())) == [0, 5, 29]
