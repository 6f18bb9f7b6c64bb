"""The overlapped evaluator (`rollout(parts=...)`) and multi-device planning (`planner.act_sharded`) play
exactly what the lock-step, one-device loop plays."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import planner, rollout
from tdmpc_jax.envs import BatchedEnv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(REPO, "checkpoints", "teacher-mt4")
PCFG = planner.PlannerConfig(iterations=2, num_samples=32, num_elites=4, num_pi_trajs=2)


@pytest.fixture(scope="module")
def agent():
    return tdmpc_jax.load_checkpoint(TEACHER)


def _slots(agent, episodes=2):
    return [(t, 1, e) for t in agent.config.tasks for e in range(episodes)]


def _play(agent, slots, parts, workers=0, length=25):
    cfg = agent.config
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    task = np.asarray([cfg.task_index(t) for t, _, _ in slots], np.int32)
    seen, timing = [], {}
    with BatchedEnv.for_episodes(slots, num_workers=workers, obs_dim=cfg.obs_dim, action_dim=cfg.action_dim) as env:
        ret = rollout.rollout(env, rollout.make_actor(cfg, PCFG, eval_mode=False), params, task, length,
                              rollout.fold_in_keys(5), state=planner.init_state(cfg, PCFG, len(slots)),
                              on_step=lambda *a: seen.append(a), until_done=False, timing=timing, parts=parts)
    return ret, seen, timing


def test_act_keys_on_a_subset_equals_act_batch(agent):
    cfg, params = agent.config, jax.tree_util.tree_map(jnp.asarray, agent.params)
    n = 8
    obs = jax.random.normal(jax.random.PRNGKey(0), (n, cfg.obs_dim))
    task = jnp.arange(n, dtype=jnp.int32) % cfg.num_tasks
    st = planner.init_state(cfg, PCFG, n)
    t0 = jnp.arange(n) % 3 == 0
    key = jax.random.PRNGKey(3)
    want_a, want_s = planner.act_batch(cfg, PCFG, params, obs, task, st, t0, key, False)
    keys = jax.random.split(key, n)
    for g in (np.arange(4), np.arange(4, 8)):
        a, s = planner.act_keys(cfg, PCFG, params, obs[g], task[g], jax.tree_util.tree_map(lambda x: x[g], st),
                                t0[g], keys[g], False)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(want_a)[g])
        np.testing.assert_array_equal(np.asarray(s.prev_mean), np.asarray(want_s.prev_mean)[g])


@pytest.mark.parametrize("n,parts,workers", [(8, 2, 0), (8, 2, 2), (7, 3, 0)])
def test_overlapped_rollout_plays_the_lockstep_episodes(agent, n, parts, workers):
    """Same seed: the same actions, rewards, observations and returns at every step, in process and with
    environment worker processes (the overlap's real use); 7 problems in 3 parts make groups of 4 and 3
    (aligned to the CPU chunk of 4, as the whole batch chunks them)."""
    slots = _slots(agent)[:n]
    want, want_seen, _ = _play(agent, slots, 1)
    got, got_seen, timing = _play(agent, slots, parts, workers)
    np.testing.assert_array_equal(got, want)
    assert len(got_seen) == len(want_seen) == timing["steps"] == 25
    for g, w in zip(got_seen, want_seen):
        assert g[0] == w[0]
        for a, b in zip(g[1:], w[1:]):
            np.testing.assert_array_equal(a, b)
    assert timing["env_s"] > 0 and timing["act_first_s"] > 0
    assert np.any(want != 0)


def test_overlap_refuses_what_it_cannot_replay(agent):
    cfg = agent.config
    slots = _slots(agent, 1)
    host = rollout.host_actor(lambda o, t, f: np.zeros((len(o), cfg.action_dim), np.float32))
    with BatchedEnv.for_episodes(slots, obs_dim=cfg.obs_dim, action_dim=cfg.action_dim) as env:
        with pytest.raises(ValueError, match="per-problem keys"):
            rollout.rollout(env, host, None, np.zeros(len(slots), np.int32), 3, rollout.fold_in_keys(1), parts=2)
        with pytest.raises(ValueError, match="params must be fixed"):
            rollout.rollout(env, rollout.make_actor(cfg, PCFG), lambda: agent.params, np.zeros(len(slots), np.int32),
                            3, rollout.fold_in_keys(1), state=planner.init_state(cfg, PCFG, len(slots)), parts=2)


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np, sys
import tdmpc_jax
from tdmpc_jax import planner
from tdmpc_jax.evaluation import evaluate
assert jax.local_device_count() == 2, jax.devices()
agent = tdmpc_jax.load_checkpoint(sys.argv[1])
cfg, params = agent.config, jax.tree_util.tree_map(jnp.asarray, agent.params)
pcfg = planner.PlannerConfig(iterations=2, num_samples=32, num_elites=4, num_pi_trajs=2)
for n in (8, 5):  # even, and padded to a multiple of the devices
    obs = jax.random.normal(jax.random.PRNGKey(n), (n, cfg.obs_dim))
    task = jnp.arange(n, dtype=jnp.int32) % cfg.num_tasks
    st = planner.init_state(cfg, pcfg, n)
    t0 = jnp.arange(n) % 2 == 0
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    a1, s1 = planner.act_keys(cfg, pcfg, params, obs, task, st, t0, keys, False)
    a2, s2 = planner.act_sharded(cfg, pcfg, params, obs, task, st, t0, keys, False)
    # groups of 4 and 4, or 4 and 1 (aligned to the CPU chunk): bit-identical
    np.testing.assert_array_equal(np.asarray(a2), np.asarray(a1))
    np.testing.assert_array_equal(np.asarray(s2.prev_mean), np.asarray(s1.prev_mean))
r1 = evaluate(agent, "cartpole-balance,pendulum-spin", 4, 1, pcfg, progress=False)
r2 = evaluate(agent, "cartpole-balance,pendulum-spin", 4, 1, pcfg, progress=False, devices=jax.local_devices())
assert r2["timing"]["devices"] == 2
for t in r1["tasks"]:
    np.testing.assert_array_equal(r2["tasks"][t]["returns"], r1["tasks"][t]["returns"])
print("OK", r1["normalized_score"], r2["normalized_score"])
"""


def test_problems_split_over_two_devices_give_the_one_device_results(tmp_path):
    """Two host devices (a fresh process: XLA_FLAGS is read at start): act_sharded equals act_keys, and a
    whole evaluation (8 problems, 4 per device) over both devices returns the one-device episodes exactly."""
    # compiled with most XLA optimizations off (JAX_DISABLE_MOST_OPTIMIZATIONS; tests/conftest.py COMPILE_BOUND):
    # the process is mostly compiles (157 -> 104 s measured); both sides of each comparison are built alike
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", MUJOCO_GL="disable",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    r = subprocess.run([sys.executable, "-c", _SHARDED, TEACHER], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_resumable_evaluation_plays_the_one_batch_episodes_and_resumes(agent, tmp_path):
    """`evaluate(resume_dir=...)` plays the batch in aligned groups with each episode's whole-batch key: the
    returns of one batch, with the overlapped loop inside the groups too; a rerun reuses the finished groups
    (a planted return survives), plays a missing one again, and refuses the partial results of other settings
    without touching them."""
    from tdmpc_jax import evaluation
    tasks = list(agent.config.tasks)  # 4 tasks x 3 episodes = 12 slots: groups of 4 (the CPU chunk)
    kw = dict(episodes=3, seed=2, pcfg=PCFG, eval_mode=False, progress=False)
    want = evaluation.evaluate(agent, tasks, **kw)
    got = evaluation.evaluate(agent, tasks, resume_dir=str(tmp_path), group=3, **kw)   # 3 -> 4: aligned
    got2 = evaluation.evaluate(agent, tasks, resume_dir=str(tmp_path / "b"), group=8, parts=2, **kw)
    part = tmp_path / evaluation.RESUME_DIR
    files = sorted(p.name for p in part.glob("episodes-*.json"))
    assert files == ["episodes-0-3.json", "episodes-4-7.json", "episodes-8-11.json"]
    for t in tasks:
        assert got["tasks"][t]["returns"] == want["tasks"][t]["returns"] == got2["tasks"][t]["returns"]
    assert got["normalized_score"] == want["normalized_score"] > 0
    assert got["agent_steps_per_s"] > 0 and got["timing"]["resumable_groups"]

    import json
    first = json.loads((part / "episodes-0-3.json").read_text())
    first["returns"][0] = 12345.0
    (part / "episodes-0-3.json").write_text(json.dumps(first))
    (part / "episodes-8-11.json").unlink()                      # killed before the last group finished
    again = evaluation.evaluate(agent, tasks, resume_dir=str(tmp_path), group=3, **kw)
    assert again["tasks"][tasks[0]]["returns"][0] == 12345.0    # reused, not replayed
    assert again["tasks"][tasks[-1]]["returns"] == want["tasks"][tasks[-1]]["returns"]  # replayed the same
    assert (part / "episodes-8-11.json").exists()

    with pytest.raises(ValueError, match="holds partial episodes with other seed"):
        evaluation.evaluate(agent, tasks, resume_dir=str(tmp_path), group=3, **{**kw, "seed": 3})
    with pytest.raises(ValueError, match="holds partial episodes with other params_sha256"):
        import dataclasses
        other = dataclasses.replace(agent, params=jax.tree_util.tree_map(lambda x: x * 1.01, agent.params))
        evaluation.evaluate(other, tasks, resume_dir=str(tmp_path), group=3, **kw)
    assert len(list(part.glob("episodes-*.json"))) == 3 and (part / "spec.json").exists()
