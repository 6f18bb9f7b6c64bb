"""Environments replay the official TD-MPC2 code's episodes (both episodes, same env object)."""
import json

import numpy as np
import pytest

from tdmpc_jax import envs
from tdmpc_jax.config import MT30_ACTION_DIMS, MT30_OBS_DIMS, MT30_TASKS

from conftest import ENV_REPLAY

with open(ENV_REPLAY) as f:
    REPLAY = json.load(f)


def _episodes(r):
    acts = np.random.RandomState(r["action_seed"]).uniform(-1, 1, size=(500, 6)).astype(np.float32)
    acts[:, r["action_dim"]:] = 0
    pol = r["policy_episode"]
    return [(acts, r["rewards"], r["obs_at"]), (np.asarray(pol["actions"], np.float32), pol["rewards"], pol["obs_at"])]


@pytest.mark.parametrize("task", sorted(REPLAY))
def test_replay_matches_official(task):
    r = REPLAY[task]
    env = envs.make(task, seed=1)
    assert (env.obs_dim, env.action_dim) == (r["obs_dim"], r["action_dim"])
    for actions, rewards, obs_at in _episodes(r):
        obs = env.reset()
        assert obs.dtype == np.float32 and obs.shape == (env.obs_dim,)
        seen, got = {0: obs}, []
        for k in range(500):
            obs, rew, done, info = env.step(actions[k, : env.action_dim])
            got.append(rew)
            seen[k + 1] = obs
            assert done == (k == 499)
        np.testing.assert_allclose(got, rewards, atol=1e-5, rtol=0)
        for k, want in obs_at.items():
            np.testing.assert_allclose(envs.pad_obs(seen[int(k)], 24), want, atol=1e-5, rtol=0,
                                       err_msg=f"{task} obs after {k} steps")


def test_all_thirty_task_dims():
    for i, task in enumerate(MT30_TASKS):
        env = envs.make(task, seed=0)
        assert (env.obs_dim, env.action_dim, env.episode_length) == (MT30_OBS_DIMS[i], MT30_ACTION_DIMS[i], 500), task
        assert env.reset().shape == (MT30_OBS_DIMS[i],)


def test_second_episode_via_advanced_env_matches_sequence():
    """BatchedEnv.for_episodes: episode 1 of a fresh env advanced by one reset == the 2nd episode."""
    task = "cup-catch"
    r = REPLAY[task]
    with envs.BatchedEnv.for_episodes([(task, 1, 1), (task, 1, 0)], obs_dim=24) as b:
        obs = b.reset()
        np.testing.assert_allclose(obs[0], r["policy_episode"]["obs_at"]["0"], atol=1e-6)
        np.testing.assert_allclose(obs[1], r["obs_at"]["0"], atol=1e-6)
