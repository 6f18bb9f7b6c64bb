"""Online training: seeding, updates, evaluation logs, resume after a kill."""
import json
import os

import numpy as np

import tdmpc_jax
from tdmpc_jax.config import TrainConfig
from tdmpc_jax.data.replay import ReplayBuffer
from tdmpc_jax.online import OnlineConfig, task_config, train_online


def test_task_config_pads_to_the_subset():
    cfg = task_config(["pendulum-spin", "reacher-easy"], "32,32,16")
    assert (cfg.obs_dim, cfg.action_dim, cfg.action_dims, cfg.obs_dims) == (6, 2, (1, 2), (3, 6))


def test_online_run_learns_logs_and_resumes(tmp_path):
    cfg = task_config(["pendulum-spin"], "32,32,16")
    tcfg = TrainConfig(batch_size=32)
    kw = dict(tasks=["pendulum-spin"], seed_steps=300, utd=0.05, eval_episodes=1, progress=False)
    out = str(tmp_path / "run")
    train_online(cfg, tcfg, OnlineConfig(episodes=1, **kw), out)  # then "killed"
    agent = train_online(cfg, tcfg, OnlineConfig(episodes=2, **kw), out)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["episode"] for r in rows] == [1, 2]
    # episode 1: nothing in the buffer yet; episode 2: the seed burst (300 x 0.05), then ~utd x 499 steps
    assert rows[0]["step"] == 0 and rows[1]["step"] in (39, 40)
    assert "eval_return/pendulum-spin" in rows[1] and "total_loss" in rows[1]
    assert np.isfinite(rows[1]["total_loss"])
    assert os.path.exists(os.path.join(out, "curve.png"))
    loaded = tdmpc_jax.load_checkpoint(os.path.join(out, "agent"))
    assert loaded.metadata["env_steps"] == 1000 and loaded.config == cfg
    assert agent.metadata["trained_steps"] == rows[1]["step"]


def test_replay_buffer_capacity_and_roundtrip():
    buf = ReplayBuffer(3, 1, capacity=25)
    for e in range(4):
        buf.add_episode(np.full((10, 3), e, np.float32), np.zeros((10, 1)), np.arange(10.0), e)
    assert buf.num_episodes == 2 and buf.num_steps == 20
    other = ReplayBuffer(3, 1)
    other.load_state_dict(buf.state_dict())
    obs, act, rew, task = other.sample(np.random.default_rng(0), 16, 3)
    assert set(task.tolist()) <= {2, 3} and np.all(obs[0, :, 0] == task)
