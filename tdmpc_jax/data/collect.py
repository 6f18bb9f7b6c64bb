"""Write a dataset by running a checkpoint (planner or policy prior, with exploration) on tasks."""
from __future__ import annotations


from typing import Sequence

import numpy as np

from tdmpc_jax import rollout
from tdmpc_jax.agent import Agent
from tdmpc_jax.data.dataset import Dataset, DatasetWriter
from tdmpc_jax.evaluation import check_dims, resolve_tasks, run_episodes
from tdmpc_jax.planner import PlannerConfig


def collect(agent: Agent, tasks, episodes: int, out_path, pcfg: PlannerConfig, seed: int = 1,
            eval_mode: bool = False, progress: bool = True, overwrite: bool = False,
            random_actions: Sequence[float] = ()) -> Dataset:
    """`episodes` episodes per task (batched); eval_mode=False adds the planner's exploration noise.
    random_actions: episode e of every task replaces each action with a uniform random one with probability
    random_actions[e % len(random_actions)] (`rollout.with_random_actions`; empty: none).

    out_path must be new, an empty directory or a dataset (replaced at the end), unless `overwrite`."""
    from tdmpc_jax.results_io import check_output
    check_output(out_path, "dataset", overwrite)  # before any episode is played
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    random_actions = tuple(float(p) for p in random_actions)
    if not all(0.0 <= p <= 1.0 for p in random_actions):
        raise ValueError(f"random_actions must be probabilities in [0, 1], got {random_actions}")
    cfg = agent.config
    tasks = resolve_tasks(agent, tasks)
    check_dims(agent, tasks)
    slots = [(t, seed, e) for t in tasks for e in range(episodes)]
    n = len(slots)
    obs_l, act_l, rew_l = [], [], []

    def on_step(t, obs, act, rew, next_obs, done):
        if t == 0:
            obs_l.append(obs.copy())
            act_l.append(np.full_like(act, np.nan))
            rew_l.append(np.full(n, np.nan, np.float32))
        obs_l.append(next_obs.copy())
        act_l.append(act.copy())
        rew_l.append(rew.copy())

    actor = None
    if any(random_actions):
        probs = [random_actions[e % len(random_actions)] for _, _, e in slots]
        actor = rollout.with_random_actions(rollout.make_actor(cfg, pcfg, eval_mode), cfg, probs)
    returns, _ = run_episodes(agent, slots, pcfg, seed, eval_mode, progress=progress, on_step=on_step, actor=actor)
    obs, act, rew = np.stack(obs_l, 1), np.stack(act_l, 1), np.stack(rew_l, 1)  # (n, T+1, ...)
    with DatasetWriter(out_path, cfg.obs_dim, cfg.action_dim, cfg.tasks if cfg.multitask else tasks,
                       cfg.task_set, overwrite=overwrite) as w:
        for i, (task, _, _) in enumerate(slots):
            w.add_episode(obs[i], act[i], rew[i], cfg.task_index(task) if cfg.multitask else 0)
    ds = Dataset(out_path)
    ds.meta_returns = {t: float(np.mean(returns[[j for j, s in enumerate(slots) if s[0] == t]])) for t in tasks}
    return ds
