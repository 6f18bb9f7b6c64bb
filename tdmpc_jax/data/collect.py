"""Write a dataset by running a checkpoint (planner or policy prior, with exploration) on tasks."""
from __future__ import annotations


import dataclasses
from typing import Optional, Sequence

import numpy as np

from tdmpc_jax import rollout
from tdmpc_jax.agent import Agent
from tdmpc_jax.data.dataset import Dataset, DatasetWriter
from tdmpc_jax.evaluation import check_dims, resolve_tasks, run_episodes
from tdmpc_jax.planner import PlannerConfig


def collect(agent: Agent, tasks, episodes: int, out_path, pcfg: PlannerConfig, seed: int = 1,
            eval_mode: bool = False, progress: bool = True, overwrite: bool = False,
            random_actions: Sequence[float] = (), resume_dir: Optional[str] = None, group: int = 16) -> Dataset:
    """`episodes` episodes per task (batched); eval_mode=False adds the planner's exploration noise.
    random_actions: episode e of every task replaces each action with a uniform random one with probability
    random_actions[e % len(random_actions)] (`rollout.with_random_actions`; empty: none).
    resume_dir: play the episodes in resumable groups of about `group` (`evaluation.EpisodeGroups`), keeping
    each finished group's transitions there (NumPy .npz, read back without pickle); a killed collection
    called again plays only the missing groups, and the dataset is written once every group is there: the
    episodes one batch plays (MPPI on a CPU bit for bit). Hours of teacher MPPI on a CPU then span sittings.
    Not with random_actions.

    out_path must be new, an empty directory or a dataset (replaced at the end), unless `overwrite`."""
    from tdmpc_jax.results_io import check_output
    check_output(out_path, "dataset", overwrite)  # before any episode is played
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    random_actions = tuple(float(p) for p in random_actions)
    if not all(0.0 <= p <= 1.0 for p in random_actions):
        raise ValueError(f"random_actions must be probabilities in [0, 1], got {random_actions}")
    if resume_dir is not None and any(random_actions):
        raise ValueError("random_actions: a resumable collection plays the planner's own actions")
    cfg = agent.config
    tasks = resolve_tasks(agent, tasks)
    check_dims(agent, tasks)
    slots = [(t, seed, e) for t in tasks for e in range(episodes)]
    if resume_dir is None:
        actor = None
        if any(random_actions):
            probs = [random_actions[e % len(random_actions)] for _, _, e in slots]
            actor = rollout.with_random_actions(rollout.make_actor(cfg, pcfg, eval_mode), cfg, probs)
        hook, arrays = _recorder(len(slots))
        returns, _ = run_episodes(agent, slots, pcfg, seed, eval_mode, progress=progress, on_step=hook, actor=actor)
        obs, act, rew = arrays()
    else:
        obs, act, rew, returns = _collect_groups(agent, slots, pcfg, seed, eval_mode, progress, resume_dir, group)
    with DatasetWriter(out_path, cfg.obs_dim, cfg.action_dim, cfg.tasks if cfg.multitask else tasks,
                       cfg.task_set, overwrite=overwrite) as w:
        for i, (task, _, _) in enumerate(slots):
            w.add_episode(obs[i], act[i], rew[i], cfg.task_index(task) if cfg.multitask else 0)
    ds = Dataset(out_path)
    ds.meta_returns = {t: float(np.mean(returns[[j for j, s in enumerate(slots) if s[0] == t]])) for t in tasks}
    return ds


def _recorder(n: int):
    """An on_step hook that records n lock-step episodes -> (hook, arrays() -> obs, action, reward), each
    (n, T+1, ...) with entry 0 of action and reward a NaN filler (the dataset's layout)."""
    obs_l, act_l, rew_l = [], [], []

    def on_step(t, obs, act, rew, next_obs, done):
        if t == 0:
            obs_l.append(obs.copy())
            act_l.append(np.full_like(act, np.nan))
            rew_l.append(np.full(n, np.nan, np.float32))
        obs_l.append(next_obs.copy())
        act_l.append(act.copy())
        rew_l.append(rew.copy())
    return on_step, lambda: (np.stack(obs_l, 1), np.stack(act_l, 1), np.stack(rew_l, 1))


def _collect_groups(agent, slots, pcfg, seed, eval_mode, progress, directory, group):
    """The resumable collection: every group's transitions from `directory` (played now where missing)
    -> (obs, action, reward, returns) of all slots, in slot order."""
    import jax
    from tdmpc_jax import atomic
    from tdmpc_jax.evaluation import EpisodeGroups, params_digest
    spec = {"what": "collect", "params_sha256": params_digest(agent.params), "slots": [list(s) for s in slots],
            "eval_mode": eval_mode, "planner": dataclasses.asdict(pcfg), "group": group,
            "backend": jax.default_backend()}
    store = EpisodeGroups(directory, spec, slots, pcfg, group, suffix=".npz")

    def start(g):
        hook, arrays = _recorder(len(g))

        def finish(returns, timing, wall):
            o, a, r = arrays()
            atomic.write_file(store.path(g), writer=lambda f: np.savez(f, obs=o, action=a, reward=r, returns=returns),
                              binary=True)
        return hook, finish

    store.play(agent, pcfg, seed, eval_mode, 0, progress, 1, None, start)
    parts = []
    for g in store.groups:
        try:
            with np.load(store.path(g), allow_pickle=False) as z:
                part = [np.asarray(z[k]) for k in ("obs", "action", "reward", "returns")]
            if any(len(x) != len(g) for x in part) or part[0].shape[1] != part[1].shape[1]:
                raise ValueError("arrays of other episodes")
            if parts and part[0].shape[1:] != parts[0][0].shape[1:]:
                raise ValueError(f"episodes of {part[0].shape[1] - 1} steps, the first group's have "
                                 f"{parts[0][0].shape[1] - 1}")
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise store.load_error(g, e) from None
        parts.append(part)
    return tuple(np.concatenate(x) for x in zip(*parts))
