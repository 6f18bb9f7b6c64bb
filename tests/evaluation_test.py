"""Evaluation: policy-prior episodes reproduce the official code; scores, CIs, errors, CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tdmpc_jax import envs, evaluation, planner
from tdmpc_jax.agent import Agent

from conftest import ENV_REPLAY, FP16_CKPT, REPO

with open(ENV_REPLAY) as f:
    REPLAY = json.load(f)
# contact-rich tasks where float noise in the first actions (~3e-5, the reference's own noise)
# grows until the trajectory departs; everything else must match the official return to 1e-3
# finger-turn-easy joined them on this project's current CPUs: its actions depart from the reference at
# step 66 (its 0/1 reward then gives 854 instead of 853), with the code of the last release as well
CHAOTIC = {"walker-walk", "cheetah-run", "cheetah-run-backwards", "cheetah-run-front", "cheetah-run-back",
           "finger-turn-easy"}


@pytest.fixture(scope="module")
def policy_run(released_agent):
    slots = [(t, 1, 1) for t in REPLAY]  # the second episode of seed 1
    returns, actions = evaluation.run_episodes(released_agent, slots, planner.PlannerConfig(mpc=False),
                                               progress=False, record_actions=True)
    return dict(zip(REPLAY, returns)), dict(zip(REPLAY, actions))


def test_policy_prior_reproduces_official_returns(policy_run):
    returns, _ = policy_run
    for task, r in REPLAY.items():
        if task in CHAOTIC:
            continue
        want = r["policy_episode"]["return"]
        assert abs(returns[task] - want) <= 1e-3 * max(abs(want), 1.0), (task, returns[task], want)


def test_chaotic_tasks_agree_until_they_diverge(policy_run):
    _, actions = policy_run
    for task in CHAOTIC:
        ref = np.asarray(REPLAY[task]["policy_episode"]["actions"], np.float32)
        np.testing.assert_allclose(actions[task][:15], ref[:15], atol=1e-3, err_msg=task)


def test_chaos_is_in_the_physics_not_the_model():
    """Replaying the official actions +-1e-4 changes a cheetah return by far more than 1e-3."""
    r = REPLAY["cheetah-run-front"]
    acts = np.asarray(r["policy_episode"]["actions"], np.float32)
    noisy = acts + np.random.RandomState(0).uniform(-1e-4, 1e-4, acts.shape).astype(np.float32)
    env = envs.make("cheetah-run-front", 1)
    env.reset()
    for a in np.random.RandomState(r["action_seed"]).uniform(-1, 1, size=(500, 6)):
        env.step(a.astype(np.float32))
    env.reset()
    total = sum(env.step(noisy[k])[1] for k in range(500))
    assert abs(total - r["policy_episode"]["return"]) > 1e-3 * r["policy_episode"]["return"]


def test_summary_and_bootstrap():
    res = evaluation.summarize({"a": np.array([100.0, 200.0, 300.0]), "b": np.array([0.0, 0.0, 30.0])})
    assert res["tasks"]["a"]["score"] == 20.0 and res["normalized_score"] == 10.5
    lo, hi = res["normalized_score_ci95"]
    assert lo < 10.5 < hi and lo >= 5.0 and hi <= 16.5
    assert evaluation.bootstrap_ci({"a": np.array([5.0, 5.0])}) == (0.5, 0.5)


def test_mpc_evaluation_is_deterministic(released_agent):
    pcfg = planner.PlannerConfig(iterations=2, num_samples=32, num_elites=8, num_pi_trajs=4)
    r1 = evaluation.evaluate(released_agent, "pendulum-spin,cup-catch", episodes=2, seed=3, pcfg=pcfg, progress=False)
    r2 = evaluation.evaluate(released_agent, ["pendulum-spin", "cup-catch"], episodes=2, seed=3, pcfg=pcfg,
                             progress=False)
    assert r1["tasks"] == r2["tasks"]
    assert set(r1["tasks"]) == {"pendulum-spin", "cup-catch"} and len(r1["tasks"]["cup-catch"]["returns"]) == 2
    assert r1["planner"]["num_samples"] == 32 and r1["seed"] == 3


def test_bad_tasks_and_dims(released_agent):
    with pytest.raises(ValueError, match="not in the checkpoint's task set"):
        evaluation.evaluate(released_agent, "dog-run", episodes=1, progress=False)
    with pytest.raises(ValueError, match="not in the checkpoint's task set"):
        evaluation.evaluate(released_agent, "walker-fly", episodes=1, progress=False)
    dims = list(released_agent.config.obs_dims)
    dims[released_agent.config.task_index("cup-catch")] = 9
    bad = Agent(dataclasses.replace(released_agent.config, obs_dims=tuple(dims)), released_agent.params,
                released_agent.target_qs)
    with pytest.raises(ValueError, match=r"cup-catch.*do not match the model's \(9, 2\)"):
        evaluation.evaluate(bad, "cup-catch", episodes=1, progress=False)


SCRIPT = os.path.join(REPO, "experiments", "evaluate.py")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_cli_writes_results_and_compares(tmp_path):
    out = tmp_path / "pol"
    r = _run(f"--checkpoint={FP16_CKPT}", "--tasks=pendulum-spin,cartpole-balance", "--episodes=2", "--mpc=false",
             f"--output={out}")
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "results.json"))
    assert set(res["tasks"]) == {"pendulum-spin", "cartpole-balance"}
    assert len(open(out / "results.csv").read().splitlines()) == 5
    assert res["tasks"]["cartpole-balance"]["mean"] > 500  # the released model balances the pole
    assert (res["timing"]["workers"], res["timing"]["parts"]) == (0, 1)  # the CPU backend's defaults
    assert res["compute"] == "fp32"
    r = _run(f"--checkpoint={FP16_CKPT}", "--tasks=cartpole-balance", "--episodes=2", "--mpc=false", "--compute=bf16",
             f"--output={tmp_path / 'bf16'}")
    assert r.returncode == 0, r.stderr
    b = json.load(open(tmp_path / "bf16" / "results.json"))
    assert b["compute"] == "bf16" and b["tasks"]["cartpole-balance"]["mean"] > 500  # bf16 matmuls still balance
    assert "ETA" in r.stderr  # progress display
    r = _run(f"--compare={out},{out}", f"--output={tmp_path / 'cmp'}")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "cmp" / "compare.png") > 10_000


def test_cli_resume_plays_the_one_batch_episodes(released_agent, tmp_path):
    """evaluate.py --resume: MPPI episodes in groups (--group=1 rounds up to the CPU chunk of 4: groups of 4
    and 2), the returns of one in-process batch bit for bit."""
    small = ["--iterations=1", "--num_samples=16", "--num_elites=2", "--num_pi_trajs=1", "--eval_mode=false"]
    r = _run(f"--checkpoint={FP16_CKPT}", "--tasks=pendulum-spin,cartpole-balance", "--episodes=3", *small,
             "--resume", "--group=1", f"--output={tmp_path / 'res'}")
    assert r.returncode == 0, r.stderr
    got = json.load(open(tmp_path / "res" / "results.json"))
    assert sorted(p.name for p in (tmp_path / "res" / "partial").glob("episodes-*.json")) == [
        "episodes-0-3.json", "episodes-4-5.json"]
    pcfg = planner.PlannerConfig(iterations=1, num_samples=16, num_elites=2, num_pi_trajs=1)
    want = evaluation.evaluate(released_agent, "pendulum-spin,cartpole-balance", episodes=3, pcfg=pcfg,
                               eval_mode=False, progress=False)
    assert {t: v["returns"] for t, v in got["tasks"].items()} == {t: v["returns"] for t, v in want["tasks"].items()}
    assert got["tasks"]["cartpole-balance"]["mean"] > 100


@pytest.mark.parametrize("args,needle", [
    (["--tasks=walker-fly"], "unknown task 'walker-fly'"),
    (["--tasks=mw-reach"], "Meta-World"),
    (["--output=/proc/nope"], "not writable"),
    (["--checkpoint=/nonexistent.pt"], "no such file"),
])
def test_cli_errors_before_work(tmp_path, args, needle):
    base = {"--checkpoint": f"--checkpoint={FP16_CKPT}", "--tasks": "--tasks=cup-catch",
            "--output": f"--output={tmp_path / 'o'}"}
    for a in args:
        base[a.split("=")[0]] = a
    r = _run(*base.values(), "--episodes=1", "--mpc=false")
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "step 1/" not in r.stderr


def test_backend_defaults_for_env_workers_and_parts():
    """evaluate.py's --workers=-1 / --parts=0: workers only where the cores do not plan, overlap only with them."""
    from tdmpc_jax.evaluation import default_parts, env_workers
    assert env_workers(-1, "cpu", cores=64) == 0 and env_workers(3, "cpu", cores=64) == 3
    assert env_workers(-1, "gpu", cores=16) == 14 and env_workers(-1, "tpu", cores=2) == 0
    assert default_parts(0) == 1 and default_parts(14) == 2
