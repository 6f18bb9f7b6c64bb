"""Crash safety of run directories: a kill at any filesystem step of a checkpoint or log rewrite
resumes to bit-identical parameters; torn log lines; one run per directory (tdmpc_jax.atomic)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tdmpc_jax import atomic
from tdmpc_jax.config import ModelConfig, TrainConfig
from tdmpc_jax.data import Dataset, DatasetWriter
from tdmpc_jax.offline import RunConfig, read_log, train_offline

from conftest import REPO

CFG = ModelConfig(obs_dim=5, action_dim=2, latent_dim=16, enc_dim=24, mlp_dim=32, num_enc_layers=2, num_q=2,
                  task_dim=8, tasks=("a", "b", "c"), action_dims=(2, 1, 2), obs_dims=(5, 3, 5),
                  episode_lengths=(500, 500, 100), dropout=0.0)
TCFG = TrainConfig(batch_size=8)
RUN = dict(log_every=1, checkpoint_every=2, progress=False)


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no `except Exception` clean-up runs."""


def _delete_some(path):
    """What a killed `rmtree(path)` leaves: part of the tree."""
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for f in files[: max(1, len(files) // 2)]:
        os.remove(f)


def kill_at(i, seen):
    """A fault hook that kills the process at the i-th filesystem step (0-based)."""
    def hook(step, path):
        seen.append(step)
        if len(seen) - 1 == i:
            if "remove" in step and os.path.isdir(path):
                _delete_some(path)
            raise Killed(f"{step} {path}")
    return hook


def kill_at_every_step(base, tmp_path, monkeypatch, run, check):
    """For i = 0, 1, ...: copy the run directory `base`, kill `run(out)` at its i-th filesystem step, then
    `check(out)` (resume and compare); stops at the first i that `run` survives. Returns (i, steps seen)."""
    i = 0
    while True:
        out = tmp_path / f"k{i}"
        shutil.copytree(base, out)
        seen = []
        monkeypatch.setattr(atomic, "_fault_hook", kill_at(i, seen))
        try:
            run(out)
            return i, seen
        except Killed:
            pass
        finally:
            monkeypatch.setattr(atomic, "_fault_hook", None)
        check(out)
        i += 1


def _leftovers(d):
    return sorted(n for n in os.listdir(d) if n.startswith(".tmp-") or n.endswith((".new", ".old")))


# --- the atomic module itself ------------------------------------------------------------------

def _write_version(path, v):
    os.makedirs(os.path.join(path, "sub"))
    for name in ("a.txt", "sub/b.txt", "sub/c.txt"):
        with open(os.path.join(path, name), "w") as f:
            f.write(f"{name} v{v}")


def _version(path):
    vs = {open(os.path.join(path, n)).read().split(" v")[1] for n in ("a.txt", "sub/b.txt", "sub/c.txt")}
    assert len(vs) == 1, f"mixed versions {vs}"  # never a half-old, half-new directory
    return int(vs.pop())


def test_replace_dir_recovers_from_a_kill_at_every_step_even_during_recovery(tmp_path, monkeypatch):
    i, cases = 0, 0
    while True:
        seen = []
        root = tmp_path / f"s{i}"
        root.mkdir()
        target = str(root / "ckpt")
        atomic.replace_dir(target, lambda p: _write_version(p, 1))
        monkeypatch.setattr(atomic, "_fault_hook", kill_at(i, seen))
        try:
            atomic.replace_dir(target, lambda p: _write_version(p, 2))
            break  # i is past the last step
        except Killed:
            pass
        finally:
            monkeypatch.setattr(atomic, "_fault_hook", None)
        expect = 2 if "commit" in seen[:-1] else 1
        # kill the recovery too, at each of its steps, then recover for good
        j = 0
        while True:
            trial = tmp_path / f"s{i}-r{j}"
            shutil.copytree(root, trial)
            monkeypatch.setattr(atomic, "_fault_hook", kill_at(j, []))
            try:
                atomic.recover_dir(str(trial / "ckpt"))
                last = True
            except Killed:
                last = False
            finally:
                monkeypatch.setattr(atomic, "_fault_hook", None)
            assert atomic.recover_dir(str(trial / "ckpt"))
            assert _version(trial / "ckpt") == expect, (seen, j)
            atomic.replace_dir(str(trial / "ckpt"), lambda p: _write_version(p, 3))  # and saving goes on
            atomic.remove_stale(str(trial), ["ckpt"])
            assert _version(trial / "ckpt") == 3 and os.listdir(trial) == ["ckpt"]
            cases += 1
            j += 1
            if last:
                break
        i += 1
    assert i >= 6 and cases > i  # stage, built, commit, remove-staging, retire, install, remove-old


def test_the_released_failure_state_resumes(tmp_path):
    """Killed inside rmtree(T.old): T complete, T.old half deleted (was: Errno 39 on every rerun)."""
    target = str(tmp_path / "ckpt")
    atomic.replace_dir(target, lambda p: _write_version(p, 1))
    _write_version(target + ".old", 0)
    _delete_some(target + ".old")
    atomic.replace_dir(target, lambda p: _write_version(p, 2))
    assert _version(target) == 2 and _leftovers(tmp_path) == []


def test_write_file_is_all_or_nothing(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    atomic.write_file(p, "old")
    for i in range(2):
        monkeypatch.setattr(atomic, "_fault_hook", kill_at(i, []))
        with pytest.raises(Killed):
            atomic.write_file(p, "new")
        monkeypatch.setattr(atomic, "_fault_hook", None)
        assert p.read_text() == "old"
    atomic.remove_stale(str(tmp_path), ["f.json"])
    atomic.write_file(p, b"new", binary=True)
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600


# --- offline training --------------------------------------------------------------------------

def _states_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ds"
    rng = np.random.RandomState(0)
    with DatasetWriter(path, CFG.obs_dim, CFG.action_dim, list(CFG.tasks)) as w:
        for e in range(6):
            w.add_episode(rng.randn(13, 5), rng.uniform(-1, 1, (13, 2)), rng.rand(13), e % 3)
    return Dataset(path)


@pytest.fixture(scope="module")
def offline(dataset, tmp_path_factory):
    """(dataset, final state of an uninterrupted 4-step run, a run dir checkpointed at step 2)."""
    root, ds = tmp_path_factory.mktemp("offline"), dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tdmpc_jax.plots.learning_curve", lambda *a, **k: None)  # speed: no png
        _, full = train_offline(CFG, TCFG, ds, str(root / "full"), RunConfig(steps=4, **RUN))
        train_offline(CFG, TCFG, ds, str(root / "base"), RunConfig(steps=2, **RUN))
    return ds, full, root / "base"


def _resume_offline(ds, out, full):
    _, state = train_offline(CFG, TCFG, ds, str(out), RunConfig(steps=4, **RUN))
    _states_equal(full, state)
    assert [r["step"] for r in read_log(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _leftovers(out) == []


def test_offline_kill_at_every_step_resumes_bit_identical(offline, tmp_path, monkeypatch):
    ds, full, base = offline
    monkeypatch.setattr("tdmpc_jax.plots.learning_curve", lambda *a, **k: None)

    def check(out):
        read_log(out / "metrics.jsonl")  # the log survives every kill, its rewrite included
        _resume_offline(ds, out, full)
    i, seen = kill_at_every_step(base, tmp_path, monkeypatch,
                                 lambda out: train_offline(CFG, TCFG, ds, str(out), RunConfig(steps=4, **RUN)), check)
    # log rewrite (2 steps), checkpoint at step 4 (7), metrics.csv (2)
    assert i >= 11, seen


def test_offline_resumes_past_a_half_deleted_old_checkpoint_and_a_torn_log_line(offline, tmp_path, monkeypatch):
    ds, full, base = offline
    monkeypatch.setattr("tdmpc_jax.plots.learning_curve", lambda *a, **k: None)
    out = tmp_path / "run"
    shutil.copytree(base, out)
    shutil.copytree(out / "train_state", out / "train_state.old")  # the state of issue #12
    _delete_some(out / "train_state.old")
    os.makedirs(out / ".tmp-state-abc123")  # a staging dir of a killed (older) version
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "total_loss": 0.12, "elap')  # killed while appending
    _resume_offline(ds, out, full)


# --- online training ---------------------------------------------------------------------------

def _online_setup():
    from tdmpc_jax.online import OnlineConfig, task_config
    cfg = task_config(["pendulum-spin"], "32,32,16")
    kw = dict(tasks=["pendulum-spin"], seed_steps=300, utd=0.05, eval_every=0, progress=False)
    return cfg, TrainConfig(batch_size=32), lambda n: OnlineConfig(episodes=n, **kw)


def test_online_kill_at_every_step_resumes_bit_identical(tmp_path, monkeypatch):
    from tdmpc_jax import online
    from tdmpc_jax.data.replay import ReplayBuffer
    cfg, tcfg, ocfg = _online_setup()
    monkeypatch.setattr("tdmpc_jax.plots.learning_curve", lambda *a, **k: None)
    online.train_online(cfg, tcfg, ocfg(2), str(tmp_path / "full"))
    like = online.train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
    full_buf = ReplayBuffer(cfg.obs_dim, cfg.action_dim)
    full, full_counters = online.load_checkpoint(tmp_path / "full", like, full_buf)
    assert full_counters["episode"] == 2 and full_counters["updates"] > 0
    base = tmp_path / "base"
    online.train_online(cfg, tcfg, ocfg(1), str(base))
    assert sorted(os.listdir(base / "checkpoint")) == ["buffer.npz", "counters.json", "train_state"]

    def check(out):
        online.train_online(cfg, tcfg, ocfg(2), str(out))
        buf = ReplayBuffer(cfg.obs_dim, cfg.action_dim)
        state, counters = online.load_checkpoint(out, like, buf)
        _states_equal(full, state)
        assert counters == full_counters
        _states_equal(full_buf.state_dict(), buf.state_dict())
        assert [r["episode"] for r in read_log(out / "metrics.jsonl")] == [1, 2]
        assert _leftovers(out) == []
    i, seen = kill_at_every_step(base, tmp_path, monkeypatch,
                                 lambda out: online.train_online(cfg, tcfg, ocfg(2), str(out)), check)
    assert i >= 9, seen  # log rewrite (2 steps) and the checkpoint after episode 2 (7)


# --- one run per directory ---------------------------------------------------------------------

def test_a_second_run_into_the_same_output_refuses_with_the_holders_pid(dataset, tmp_path):
    ds = dataset
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from tdmpc_jax.atomic import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        needle = f"in use by another run \\(pid {holder.pid}\\)"
        with pytest.raises(atomic.RunLockedError, match=needle):
            train_offline(CFG, TCFG, ds, str(out), RunConfig(steps=2, **RUN))
        from tdmpc_jax.online import train_online
        cfg, tcfg, ocfg = _online_setup()
        with pytest.raises(atomic.RunLockedError, match=needle):
            train_online(cfg, tcfg, ocfg(1), str(out))
        assert sorted(os.listdir(out)) == [".lock"]  # the refused runs wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with atomic.RunLock(out):  # a killed holder leaves no stale lock
        pass
    # and in one process: a held lock refuses, a released one is free again
    lock = atomic.RunLock(out).acquire()
    with pytest.raises(atomic.RunLockedError, match=f"pid {os.getpid()}"):
        atomic.RunLock(out).acquire()
    lock.release()
    atomic.RunLock(out).acquire().release()


def test_two_cli_runs_into_one_output_the_second_refuses_in_one_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "experiments", "train_online.py"), "--tasks=pendulum-spin", f"--output={out}",
           "--size=32,32,16", "--batch_size=32", "--eval_every=0"]
    first = subprocess.Popen(cmd + ["--episodes=1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # until the first run holds the lock (its pid is in .lock)
            if (out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid):
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        else:
            raise AssertionError("the first run never took the lock")
        r = subprocess.run(cmd + ["--episodes=1"], capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"(pid {first.pid})" in err[0], r.stderr
