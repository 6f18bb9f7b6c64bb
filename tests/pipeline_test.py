"""`make distill`'s pipeline on the committed teacher, tiny budget; killed mid-run, then run again."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import tdmpc_jax

from conftest import REPO

SCRIPT = os.path.join(REPO, "experiments", "pipeline.py")
TEACHER = os.path.join(REPO, "checkpoints", "teacher-mt4")


def test_committed_teacher_loads():
    t = tdmpc_jax.load_checkpoint(TEACHER)
    assert t.config.tasks == ("cartpole-balance", "cartpole-swingup", "pendulum-spin", "finger-spin")
    assert t.metadata["env_steps"] == 32000 and t.num_params()["learnable"] == 109_715


def test_pipeline_killed_then_rerun(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, SCRIPT, f"--output={out}", "--steps=60", "--collect_episodes=1", "--episodes=1",
            "--batch_size=32", "--mpc=false", "--collect_mpc=false", "--tasks=cartpole-balance,pendulum-spin"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    deadline = time.time() + 600
    while "training the distilled" not in seen and time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        seen += line
    time.sleep(8)  # inside training: compile / first updates / a checkpoint
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert "training the distilled" in seen, seen
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(reused)" in r.stdout  # the dataset written before the kill is valid and reused
    res = json.load(open(out / "results.json"))
    assert set(res) == {"teacher", "distilled", "scratch", "distilled-int8"}
    assert set(res["teacher"]["tasks"]) == {"cartpole-balance", "pendulum-spin"}
    table = (out / "table.md").read_text()
    assert "normalized score" in table and "distilled-int8" in table
    assert (out / "compare.png").stat().st_size > 10_000
    assert tdmpc_jax.load_checkpoint(out / "distilled-int8").metadata["param_format"] == "int8"
    # both students average their weights after updates 40, 45, ..., 60 (the default last third, 5 snapshots),
    # across the kill; the int8 student is the averaged one quantized
    for name in ("distilled", "scratch"):
        assert tdmpc_jax.load_checkpoint(out / name / "agent").metadata["averaged_snapshots"] == 5
    assert json.load(open(out / "settings.json"))["average_snapshots"] == 5
    steps = [json.loads(l)["step"] for l in open(out / "distilled" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no duplicated / stale log lines


def test_pipeline_onpolicy_round(tmp_path):
    """--onpolicy_rounds=1: half the updates on the teacher's data, then the distilled student's own MPPI
    episodes are appended (merge = the teacher's episodes unchanged, then the student's) and both students
    finish the updates on the union."""
    from tdmpc_jax.data import Dataset
    out = tmp_path / "run"
    args = [sys.executable, SCRIPT, f"--output={out}", "--steps=40", "--collect_episodes=1", "--episodes=1",
            "--batch_size=32", "--mpc=false", "--collect_mpc=false", "--tasks=cartpole-balance,pendulum-spin",
            "--onpolicy_rounds=1", "--num_samples=16", "--iterations=1"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "round 1: the distilled student collects 1 episodes per task" in r.stdout
    data, visits, merged = (Dataset(out / d) for d in ("data", "data-onpolicy-1", "data-merged-1"))
    assert (data.num_episodes, visits.num_episodes, merged.num_episodes) == (2, 2, 4)
    n = data.num_steps
    for k in ("obs", "reward", "task"):
        np.testing.assert_array_equal(np.asarray(merged.arrays[k][:n]), np.asarray(data.arrays[k][:n]))
        np.testing.assert_array_equal(np.asarray(merged.arrays[k][n:]), np.asarray(visits.arrays[k]))
    for name in ("distilled", "scratch"):
        steps = [json.loads(l)["step"] for l in open(out / name / "metrics.jsonl")]
        assert steps == sorted(set(steps)) and steps[-1] == 40
    assert json.load(open(out / "settings.json"))["onpolicy_rounds"] == 1
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=900)  # everything is reused
    assert r2.returncode == 0 and "round 1: dataset" in r2.stdout and "(reused)" in r2.stdout, r2.stdout + r2.stderr
