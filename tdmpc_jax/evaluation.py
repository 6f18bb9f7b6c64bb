"""Batched evaluation: every (task, episode) of a run in lock-step, scores and bootstrap CIs.

Episode i of task T with seed S is the official protocol's episode (env built with `random=S`,
episodes in sequence; see `BatchedEnv.for_episodes`). A DMC task's score is its mean return / 10;
the normalized score is the unweighted mean over tasks.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import planner, rollout
from tdmpc_jax.agent import Agent
from tdmpc_jax.envs import BatchedEnv, make
from tdmpc_jax.planner import PlannerConfig
from tdmpc_jax.progress import Progress


def resolve_tasks(agent: Agent, tasks: str | Sequence[str]) -> List[str]:
    """'mt30' / 'mt80' / 'a,b,c' / a list -> task names, validated against the agent's task set."""
    from tdmpc_jax.config import TASK_SETS
    if isinstance(tasks, str):
        tasks = list(TASK_SETS[tasks].tasks) if tasks in TASK_SETS else [t for t in tasks.split(",") if t]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    cfg = agent.config
    for t in tasks:
        if cfg.multitask and t not in cfg.tasks:
            raise ValueError(f"task {t!r} is not in the checkpoint's task set ({cfg.task_set or cfg.num_tasks} tasks)")
        if t.startswith("mw-"):
            raise ValueError(f"task {t!r}: Meta-World environments are not supported yet")
    return tasks


def check_dims(agent: Agent, tasks: Sequence[str]):
    """Build each task once and check its obs/action dims against the model before long work."""
    cfg = agent.config
    for t in tasks:
        env = make(t, 0)
        if cfg.multitask:
            i = cfg.task_index(t)
            want = (cfg.obs_dims[i], cfg.action_dims[i])
        else:
            want = (cfg.obs_dim, cfg.action_dim)
        if (env.obs_dim, env.action_dim) != want:
            raise ValueError(f"task {t!r}: environment obs/action dims {(env.obs_dim, env.action_dim)} do not "
                             f"match the model's {want}")


def run_episodes(agent: Agent, slots: Sequence[tuple], pcfg: PlannerConfig, seed: int = 1,
                 eval_mode: bool = True, num_workers: int = 0, progress: bool = True,
                 record_actions: bool = False, on_step=None, actor=None, timing=None, parts: int = 1,
                 devices=None):
    """Play every slot (task, env_seed, episode_index) to the end in lock-step. -> (returns, actions).

    parts > 1: overlap planning with environment stepping (`rollout.rollout(parts=...)`: the same
    returns; it pays with env workers or an accelerator). devices: split the problems over these devices
    (`planner.act_sharded`; the same returns as one device).

    on_step(t, obs, actions, rewards, next_obs, dones), if given, sees every lock-step transition.
    actor, if given, acts instead of the JAX planner (a `rollout` actor, e.g. an exported agent's
    `rollout.host_actor(tdmpc_jax_runtime.OnnxAgent(...).act_batch)`). timing: a dict that receives
    `rollout`'s split of the wall time (acting, environments, hooks).
    """
    cfg = agent.config
    if actor is None:
        actor = rollout.make_actor(cfg, pcfg, eval_mode, devices=devices)
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    task_ids = jnp.asarray([cfg.task_index(t) if cfg.multitask else 0 for t, _, _ in slots], jnp.int32)
    n = len(slots)
    actions_log = [] if record_actions else None

    with BatchedEnv.for_episodes(slots, num_workers=num_workers, obs_dim=cfg.obs_dim,
                                 action_dim=cfg.action_dim) as env:
        length = int(env.episode_lengths.max())
        bar = Progress(length, "steps", desc=f"{n} envs  ", enabled=progress)  # lock-step steps of all n envs

        def hook(t, obs, act, rew, next_obs, done):
            if record_actions:
                actions_log.append(act)
            if on_step is not None:
                on_step(t, obs, act, rew, next_obs, done)
            bar.update()

        with bar:
            returns = rollout.rollout(env, actor, params, task_ids, length, rollout.fold_in_keys(seed),
                                      state=planner.init_state(cfg, pcfg, n), on_step=hook, timing=timing,
                                      parts=parts)
    return returns, (np.stack(actions_log, 1) if record_actions else None)


def env_workers(requested: int = -1, backend: Optional[str] = None, cores: Optional[int] = None) -> int:
    """Environment worker processes for an evaluation: `requested` if >= 0, else the backend's default: on an
    accelerator every core but two (one drives the device, one is the OS's; an H100 host with 16 cores: 14,
    the measured 57.6 s MT30 run), on a CPU none (its cores plan: planning was 98% of an evaluation's time on
    this project's 2-core CPU)."""
    if requested >= 0:
        return requested
    backend = backend or jax.default_backend()
    if cores is None:
        cores = os.cpu_count() or 1
    return 0 if backend == "cpu" else max(0, cores - 2)


def default_parts(workers: int) -> int:
    """Groups planned in turn while the others' environments step: 2 when the environments step in workers
    (the overlap has something to hide), else 1 (lock-step)."""
    return 2 if workers > 0 else 1


def bootstrap_ci(per_task_returns: Dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0, level=0.95):
    """Percentile CI of the normalized score, resampling episodes within each task."""
    rng = np.random.default_rng(seed)
    scores = np.zeros(n_boot)
    for r in per_task_returns.values():
        r = np.asarray(r, np.float64)
        idx = rng.integers(0, len(r), size=(n_boot, len(r)))
        scores += r[idx].mean(1) / 10.0
    scores /= len(per_task_returns)
    lo, hi = np.quantile(scores, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(per_task_returns: Dict[str, np.ndarray]) -> dict:
    tasks = {}
    for t, r in per_task_returns.items():
        r = np.asarray(r, np.float64)
        lo, hi = bootstrap_ci({t: r})
        tasks[t] = {"returns": [float(x) for x in r], "mean": float(r.mean()), "std": float(r.std()),
                    "score": float(r.mean() / 10.0), "score_ci95": [lo, hi]}
    norm = float(np.mean([v["score"] for v in tasks.values()]))
    return {"tasks": tasks, "normalized_score": norm, "normalized_score_ci95": list(bootstrap_ci(per_task_returns))}


def evaluate(agent: Agent, tasks, episodes: int = 10, seed: int = 1, pcfg: Optional[PlannerConfig] = None,
             eval_mode: bool = True, num_workers: int = 0, progress: bool = True, actor=None, parts: int = 1,
             devices=None) -> dict:
    """Evaluate `episodes` episodes of each task, all batched; returns the results dict (`actor`: a
    `tdmpc_jax.rollout` actor instead of the JAX planner; `parts`, `devices`: see `run_episodes`)."""
    pcfg = pcfg or PlannerConfig()
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    tasks = resolve_tasks(agent, tasks)
    check_dims(agent, tasks)
    slots = [(t, seed, e) for t in tasks for e in range(episodes)]
    t0 = time.perf_counter()
    timing = {}
    returns, _ = run_episodes(agent, slots, pcfg, seed, eval_mode, num_workers, progress, actor=actor,
                              timing=timing, parts=parts, devices=devices)
    wall = time.perf_counter() - t0
    per_task = {t: returns[i * episodes:(i + 1) * episodes] for i, t in enumerate(tasks)}
    out = summarize(per_task)
    out.update(checkpoint=str(agent.metadata.get("source", "")), seed=seed, episodes=episodes,
               eval_mode=eval_mode, planner=dataclasses.asdict(pcfg), wall_time_s=wall,
               agent_steps_per_s=len(slots) * timing["steps"] / wall, jax_backend=jax.default_backend(),
               timing={"first_step_s (compile included)": timing["act_first_s"], "act_s (plan + transfer)":
                       timing["act_s"], "env_s": timing["env_s"], "hooks_s": timing["hook_s"],
                       "setup_s (envs, params)": wall - timing["act_first_s"] - timing["act_s"]
                       - timing["env_s"] - timing["hook_s"], "lockstep_steps": timing["steps"],
                       "workers": num_workers, "parts": parts,
                       "devices": len(devices) if devices is not None else 1})
    return out
