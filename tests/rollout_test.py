"""rollout: the one lock-step loop plays what a hand-written loop plays; actors' interface."""
import jax
import numpy as np
import pytest

from tdmpc_jax import rollout
from tdmpc_jax.envs import BatchedEnv

import os

_TEACHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "teacher-mt4")
SLOTS = [("pendulum-spin", 1, 0), ("cartpole-balance", 1, 1), ("reacher-easy", 2, 0)]


def _policy(obs, key, step):
    """A deterministic function of the observation, key and step (n, A=2)."""
    noise = np.asarray(jax.random.uniform(key, (len(obs), 2), minval=-0.1, maxval=0.1))
    return (np.tanh(obs[:, :2] + 0.01 * step) * 0.9 + noise).astype(np.float32)


def test_rollout_matches_a_hand_loop():
    keys = rollout.fold_in_keys(3)
    length = 40

    with BatchedEnv.for_episodes(SLOTS, action_dim=2) as env:  # by hand
        obs = env.reset()
        want_returns, want = np.zeros(len(SLOTS)), []
        for t in range(length):
            act = _policy(obs, keys(t), t)
            next_obs, rew, done = env.step(act)
            want.append((t, obs, act, rew, next_obs, done))
            want_returns += rew
            obs = next_obs
            if done.all():
                break

    seen, states = [], []

    def actor(params, obs, task, state, t0, key):
        assert params == {"w": 1} and list(task) == [0, 1, 2] and np.all(np.asarray(t0) == (state == 0))
        states.append(state)
        return _policy(obs, key, state), state + 1

    with BatchedEnv.for_episodes(SLOTS, action_dim=2) as env:
        got_returns = rollout.rollout(env, actor, lambda: {"w": 1}, np.arange(3), length, keys, state=0,
                                      on_step=lambda *a: seen.append(a))
    np.testing.assert_array_equal(got_returns, want_returns)
    assert states == list(range(length)) and len(seen) == len(want)
    for g, w in zip(seen, want):
        assert g[0] == w[0]
        for a, b in zip(g[1:], w[1:]):
            np.testing.assert_array_equal(a, b)


def test_rollout_stops_when_every_episode_ended_unless_told():
    calls = []
    act = rollout.host_actor(lambda obs, task, t0: calls.append(1) or np.zeros((len(obs), 1), np.float32))
    with BatchedEnv.for_episodes([("pendulum-spin", 1, 0)]) as env:
        r = rollout.rollout(env, act, None, np.zeros(1, np.int32), 10 ** 6, jax.random.PRNGKey)
        assert len(calls) == env.envs[0].episode_length and r.shape == (1,)
        calls.clear()
        rollout.rollout(env, act, None, np.zeros(1, np.int32), 7, jax.random.PRNGKey, until_done=False)
        assert len(calls) == 7


def test_rollout_rejects_non_finite_actions():
    bad = rollout.host_actor(lambda obs, task, t0: np.full((len(obs), 1), np.nan, np.float32))
    with BatchedEnv.for_episodes([("pendulum-spin", 1, 0)]) as env:
        with pytest.raises(FloatingPointError, match="non-finite actions at step 0"):
            rollout.rollout(env, bad, None, np.zeros(1, np.int32), 5, jax.random.PRNGKey)


def test_rollout_reports_where_the_time_went():
    """timing: the actor's first call (compile) apart from the others, environments, hooks; a slow actor
    and a slow hook show up in their own entries."""
    import time

    def slow_actor(obs, task, t0):
        time.sleep(0.02 if bool(np.asarray(t0)[0]) else 0.005)
        return np.zeros((len(obs), 1), np.float32)

    timing = {}
    t = time.perf_counter()
    with BatchedEnv.for_episodes([("pendulum-spin", 1, 0)]) as env:
        rollout.rollout(env, rollout.host_actor(slow_actor), None, np.zeros(1, np.int32), 6, jax.random.PRNGKey,
                        on_step=lambda *a: time.sleep(0.01), timing=timing)
    wall = time.perf_counter() - t
    assert timing["steps"] == 6
    assert timing["act_first_s"] >= 0.02 and timing["act_s"] >= 5 * 0.005 and timing["hook_s"] >= 6 * 0.01
    assert timing["env_s"] > 0
    assert timing["act_first_s"] + timing["act_s"] + timing["env_s"] + timing["hook_s"] <= wall


def test_with_random_actions_swaps_at_the_given_rate_on_the_task_dims():
    """Problem i plays a uniform random action (on its task's action dims) with probability probs[i]."""
    import jax.numpy as jnp

    import tdmpc_jax
    from tdmpc_jax import networks
    teacher = tdmpc_jax.load_checkpoint(_TEACHER)
    cfg = teacher.config
    task = jnp.asarray([0, 1, 2, 3, 3], jnp.int32)
    probs = [0.0, 1.0, 0.5, 1.0, 0.0]
    base = lambda params, obs, task, state, t0, key: (jnp.full((len(obs), cfg.action_dim), 0.5), state)
    actor = rollout.with_random_actions(base, cfg, probs)
    mask = np.asarray(networks.task_action_mask(cfg, task))
    keys = rollout.fold_in_keys(4)
    acts = np.stack([np.asarray(actor(None, np.zeros((5, 1)), task, None, None, keys(t))[0]) for t in range(300)])
    swapped = np.any(acts != 0.5, axis=-1)  # (T, 5)
    np.testing.assert_array_equal(swapped[:, [0, 4]], False)  # probability 0: the actor's own actions
    assert swapped[:, [1, 3]].all()
    assert 0.4 < swapped[:, 2].mean() < 0.6, swapped[:, 2].mean()
    assert np.all(np.abs(acts) <= 1.0)
    np.testing.assert_array_equal(acts[:, [1, 3]] * (1 - mask[[1, 3]]), 0.0)  # nothing on a task's unused dims
    used = acts[:, 1][:, mask[1] > 0]
    assert abs(used.mean()) < 0.1 and 0.5 < used.std() < 0.65  # uniform on [-1, 1]: std 0.577
    again = np.stack([np.asarray(actor(None, np.zeros((5, 1)), task, None, None, keys(t))[0]) for t in range(300)])
    np.testing.assert_array_equal(acts, again)  # a function of the step's key


def test_collect_with_random_actions(tmp_path):
    """collect(random_actions=(0, 1)): episode 0 of a task is the clean collection's, episode 1 random."""
    import tdmpc_jax
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.planner import PlannerConfig
    teacher = tdmpc_jax.load_checkpoint(_TEACHER)
    kw = dict(pcfg=PlannerConfig(mpc=False), seed=2, eval_mode=True, progress=False)
    clean = collect(teacher, ["cartpole-balance"], 2, tmp_path / "clean", **kw)
    noisy = collect(teacher, ["cartpole-balance"], 2, tmp_path / "noisy", random_actions=(0.0, 1.0), **kw)
    a_clean, a_noisy = (np.asarray(d.arrays["action"]).reshape(2, -1, d.action_dim) for d in (clean, noisy))
    np.testing.assert_array_equal(a_noisy[0], a_clean[0])
    dim = 1  # cartpole: one action dim, the rest padding
    assert not np.allclose(a_noisy[1, 1:, :dim], a_clean[1, 1:, :dim])
    assert 0.5 < np.nanstd(a_noisy[1, 1:, :dim]) < 0.65
    with pytest.raises(ValueError, match="probabilities in"):
        collect(teacher, ["cartpole-balance"], 1, tmp_path / "bad", random_actions=(1.5,), **kw)


def test_resumable_collection_writes_the_one_batch_dataset(tmp_path):
    """collect(resume_dir=...): MPPI episodes in chunk-aligned groups (group 1 -> the CPU chunk of 4: groups
    of 4 and 2), each kept as it finishes; the dataset equals the one-batch collection's array for array,
    also when a killed collection is called again (only the missing group is played)."""
    import tdmpc_jax
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.planner import PlannerConfig
    teacher = tdmpc_jax.load_checkpoint(_TEACHER)
    tasks = ["pendulum-spin", "cartpole-balance"]
    kw = dict(pcfg=PlannerConfig(iterations=1, num_samples=16, num_elites=2, num_pi_trajs=1), seed=2,
              eval_mode=False, progress=False)
    want = collect(teacher, tasks, 3, tmp_path / "one", **kw)
    part = tmp_path / "partial"
    got = collect(teacher, tasks, 3, tmp_path / "groups", resume_dir=str(part), group=1, **kw)
    assert sorted(p.name for p in part.glob("episodes-*")) == ["episodes-0-3.npz", "episodes-4-5.npz"]
    (part / "episodes-4-5.npz").unlink()                       # killed before the last group was kept
    again = collect(teacher, tasks, 3, tmp_path / "again", resume_dir=str(part), group=1, **kw)
    for ds in (got, again):
        for k in ("obs", "action", "reward", "task"):
            np.testing.assert_array_equal(np.asarray(ds.arrays[k]), np.asarray(want.arrays[k]), err_msg=k)
        assert ds.meta_returns == want.meta_returns
    with pytest.raises(ValueError, match="holds partial episodes with other slots"):
        collect(teacher, tasks, 2, tmp_path / "x", resume_dir=str(part), group=1, **kw)
    with pytest.raises(ValueError, match="resumable collection plays the planner's own actions"):
        collect(teacher, tasks, 2, tmp_path / "y", resume_dir=str(tmp_path / "p2"), random_actions=(0.5,), **kw)
    assert not (tmp_path / "x").exists() and len(list(part.glob("episodes-*"))) == 2
