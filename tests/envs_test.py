"""make(), multi-task padding, batched stepping and bad input."""
import numpy as np
import pytest

from tdmpc_jax import envs


def test_name_parsing_and_stock_tasks():
    assert envs.parse_task("cheetah-run-backwards") == ("cheetah", "run_backwards")
    assert envs.parse_task("cup-spin") == ("ball_in_cup", "spin")
    assert envs.parse_task("reacher-three-easy") == ("reacher", "three_easy")
    env = envs.make("dog-run", seed=0)  # any stock suite task in TD-MPC2 naming
    assert (env.obs_dim, env.action_dim) == (223, 38)
    assert "pendulum-spin" in envs.known_tasks() and "walker-walk" in envs.known_tasks()


@pytest.mark.parametrize("name", ["walker-fly", "nonsense", "mw-assembly", "", None])
def test_unknown_task(name):
    with pytest.raises(ValueError, match="unknown task"):
        envs.make(name)


def test_wrong_action_shape_and_nan_do_not_touch_physics():
    env = envs.make("walker-walk", seed=0)
    env.reset()
    state = env.physics.get_state().copy()
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        env.step(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([0, 0, np.nan, 0, 0, 0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        env.step(np.array([0, 0, np.inf, 0, 0, 0]))
    np.testing.assert_array_equal(env.physics.get_state(), state)
    obs, r, done, info = env.step(np.zeros(6))
    assert np.all(np.isfinite(obs)) and info == {"success": 0.0, "terminated": 0.0}


def test_step_before_reset_and_after_done():
    env = envs.make("pendulum-swingup", seed=0, episode_length=3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1))
    env.reset()
    dones = [env.step(np.zeros(1))[2] for _ in range(3)]
    assert dones == [False, False, True]
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(np.zeros(1))


def test_action_repeat_sums_two_control_rewards():
    a, b = envs.make("cartpole-balance", seed=3), envs.make("cartpole-balance", seed=3, action_repeat=1)
    a.reset(), b.reset()
    _, r2, _, _ = a.step(np.array([0.3], np.float32))
    _, r1a, _, _ = b.step(np.array([0.3], np.float32))
    _, r1b, _, _ = b.step(np.array([0.3], np.float32))
    assert abs(r2 - (r1a + r1b)) < 1e-12


def test_multitask_env_pads_and_truncates():
    mt = envs.MultitaskEnv("mt30", seed=1, tasks=["pendulum-spin", "walker-walk"])
    obs = mt.reset(29)
    assert obs.shape == (24,) and np.all(obs[3:] == 0)
    obs, r, done, _ = mt.step(np.array([0.5, 9, 9, 9, 9, 9], np.float32))  # extra dims ignored
    assert obs.shape == (24,)
    assert mt.action_masks.shape == (30, 6) and mt.action_masks[29].sum() == 1
    with pytest.raises(ValueError, match="not loaded"):
        mt.reset(3)
    with pytest.raises(ValueError, match="unknown task"):
        envs.MultitaskEnv("mt30", tasks=["walker-fly"])


@pytest.mark.parametrize("threads", [0, 2])
def test_batched_equals_one_by_one(threads):
    slots = [("cartpole-swingup", 1, 0), ("reacher-easy", 1, 0), ("cheetah-run", 2, 1), ("cartpole-swingup", 1, 2)]
    rng = np.random.RandomState(0)
    acts = rng.uniform(-1, 1, size=(20, len(slots), 6)).astype(np.float32)
    with envs.BatchedEnv.for_episodes(slots, num_workers=threads) as b:
        obs_b = [b.reset()]
        rew_b = []
        for t in range(20):
            o, r, d = b.step(acts[t])
            obs_b.append(o)
            rew_b.append(r)
    for j, (task, seed, ep) in enumerate(slots):
        env = envs.make(task, seed)
        for _ in range(ep):
            env.reset()
        o = env.reset()
        np.testing.assert_array_equal(envs.pad_obs(o, 17), obs_b[0][j])
        for t in range(20):
            o, r, _, _ = env.step(acts[t, j, : env.action_dim])
            np.testing.assert_array_equal(envs.pad_obs(o, 17), obs_b[t + 1][j])
            assert np.float32(r) == rew_b[t][j]


def test_workers_start_side_by_side_and_nothing_is_built_here(monkeypatch):
    """Every worker process is started before the first is waited for (one after another, 14 workers took
    64 s of a 115 s MT30 evaluation on an H100), and registered tasks' dims come from the registry: the
    parent builds no env. A worker that fails to start is reported, and the others are closed."""
    from tdmpc_jax.envs import batched
    started, seen = [], []
    init, wait = batched._RemoteShard.__init__, batched._RemoteShard.wait_ready

    def counting_init(self, *a, **k):
        init(self, *a, **k)
        started.append(self)

    def recording_wait(self):
        seen.append(len(started))
        wait(self)

    monkeypatch.setattr(batched._RemoteShard, "__init__", counting_init)
    monkeypatch.setattr(batched._RemoteShard, "wait_ready", recording_wait)
    monkeypatch.setattr(batched, "make", lambda *a, **k: pytest.fail("the parent built an env"))
    slots = [("cartpole-swingup", 1, 0), ("reacher-easy", 1, 0), ("cheetah-run", 2, 1)]
    with envs.BatchedEnv.for_episodes(slots, num_workers=3) as b:
        assert seen == [3, 3, 3]
        assert b.episode_lengths.tolist() == [500, 500, 500] and b.action_dims.tolist() == [1, 2, 6]
        assert b.reset().shape == (3, 17)

    def dies(self):
        self.proc.kill()
        self.proc.join()
        wait(self)

    monkeypatch.setattr(batched._RemoteShard, "wait_ready", dies)
    started.clear()
    with pytest.raises(RuntimeError, match="failed to start"):
        envs.BatchedEnv.for_episodes(slots, num_workers=2)
    assert all(not sh.proc.is_alive() for sh in started)


def test_batched_partial_async_and_bad_actions():
    with envs.BatchedEnv([envs.make("pendulum-swingup", 0, episode_length=2), envs.make("cartpole-balance", 0)]) as b:
        b.reset()
        b.step_async(np.zeros((1, 1)), idx=[0])
        with pytest.raises(RuntimeError, match="step_wait"):
            b.step_async(np.zeros((1, 1)), idx=[1])
        b.step_wait()
        with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
            b.step(np.zeros((2, 3)))
        with pytest.raises(ValueError, match=r"slots \[1\]"):
            b.step(np.array([[0.0], [np.nan]]))
        _, _, d = b.step(np.zeros((2, 1)))
        assert d.tolist() == [True, False]
        o, r, d = b.step(np.zeros((2, 1)))  # a finished slot stays done with reward 0
        assert d[0] and r[0] == 0.0
