"""Plan fidelity: does a student's model rank action sequences the way its teacher's does, where it plans?

MPPI acts on the planner return G(s, a_{0:H}) = sum_h gamma^h r_h + gamma^H Q(z_H, pi(z_H)) of candidate
action sequences from the current state; only their order within one state matters. For a set of
observations, `rank_fidelity` draws MPPI's first-iteration candidates (clip(N(0, max_std^2)) on the task's
action dims) and returns, per state, the Pearson correlation of the student's and the teacher's G over them
and the regret of the student's choice, (max G_t - G_t[argmax G_s]) / std(G_t) (0: it picks what the teacher
would; ~1: one teacher standard deviation worse). Measured on dataset states and on the states the
student's own MPPI visits (`visited_states`), it separates "the student learnt the teacher's values" from
"the student's values hold where its planner takes it" (covariate shift; docs/distillation.md).

G is `planner.estimate_value` with the policy mean at the horizon and the first two Q members: a
deterministic version of what MPPI computes (MPPI draws the terminal policy noise and a random pair).
"""
from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import networks, planner, rollout
from tdmpc_jax.agent import Agent
from tdmpc_jax.envs import BatchedEnv, make
from tdmpc_jax.planner import PlannerConfig


def _returns(cfg, params, obs, task, actions):
    """G of every sequence in actions (H, N, A) from one observation obs (O,) of task (): (N,)."""
    n = actions.shape[1]
    emb = networks.embed(cfg, params, jnp.full((n,), task, jnp.int32))
    z = networks.encode(cfg, params, jnp.broadcast_to(obs, (n,) + obs.shape), emb)
    mask = networks.task_action_mask(cfg, task)
    gamma = networks.discounts(cfg)[task] if cfg.multitask else networks.discounts(cfg)[0]
    return planner.estimate_value(cfg, params, z, actions, mask, gamma, emb=emb,
                                  pi_eps=jnp.zeros((n, cfg.action_dim)), q_idx=jnp.arange(2))


def candidates(cfg, pcfg: PlannerConfig, task, key, n: int):
    """MPPI's first-iteration samples: clip(N(0, max_std^2), -1, 1) on the task's action dims, (H, n, A)."""
    eps = jax.random.normal(key, (pcfg.horizon, n, cfg.action_dim))
    return jnp.clip(pcfg.max_std * eps, -1.0, 1.0) * networks.task_action_mask(cfg, task)


def _state_stats(s_cfg, t_cfg, pcfg, n, s_params, t_params, obs, task, key):
    a = candidates(t_cfg, pcfg, task, key, n)
    g_s, g_t = _returns(s_cfg, s_params, obs, task, a), _returns(t_cfg, t_params, obs, task, a)
    ds, dt = g_s - g_s.mean(), g_t - g_t.mean()
    corr = jnp.sum(ds * dt) / jnp.sqrt(jnp.sum(ds ** 2) * jnp.sum(dt ** 2) + 1e-12)
    regret = (g_t.max() - g_t[jnp.argmax(g_s)]) / (jnp.std(g_t) + 1e-6)
    return corr, regret


_stats = jax.jit(jax.vmap(_state_stats, in_axes=(None,) * 4 + (None, None, 0, None, 0)), static_argnums=(0, 1, 2, 3))


def rank_fidelity(student: Agent, teacher: Agent, obs, task: int, seed: int = 0, pcfg: PlannerConfig = None,
                  num_candidates: int = 128) -> Dict[str, np.ndarray]:
    """Per state of obs (S, O) (padded to the agents' obs_dim), task index `task` of both agents:
    {'corr': (S,), 'regret': (S,)} over `num_candidates` MPPI-like sequences (the same ones for both)."""
    pcfg = pcfg or PlannerConfig()
    obs = jnp.asarray(obs, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(seed), obs.shape[0])
    as_jnp = lambda p: jax.tree_util.tree_map(jnp.asarray, p)
    corr, regret = _stats(student.config, teacher.config, pcfg, num_candidates, as_jnp(student.params),
                          as_jnp(teacher.params), obs, jnp.int32(task), keys)
    return {"corr": np.asarray(corr), "regret": np.asarray(regret)}


def visited_states(agent: Agent, task: str, pcfg: PlannerConfig, steps: int, seed: int = 1):
    """The observations (steps, O) of one episode of `task` played by the agent's MPPI (eval mode; seed
    `seed`), and its return over those steps."""
    cfg = agent.config
    env = make(task, seed)
    batch = BatchedEnv([env], cfg.obs_dim, cfg.action_dim)
    seen = []
    ret = rollout.rollout(batch, rollout.make_actor(cfg, pcfg), jax.tree_util.tree_map(jnp.asarray, agent.params),
                          np.asarray([cfg.task_index(task) if cfg.multitask else 0], np.int32),
                          min(steps, env.episode_length), rollout.fold_in_keys(seed),
                          state=planner.init_state(cfg, pcfg, 1), obs=batch.reset(),
                          on_step=lambda t, obs, *_: seen.append(np.array(obs[0])))[0]
    batch.close()
    return np.stack(seen), float(ret)


def _summary(d):
    return {"corr_median": float(np.nanmedian(d["corr"])), "corr_mean": float(np.nanmean(d["corr"])),
            "regret_median": float(np.median(d["regret"])), "states": int(len(d["corr"]))}


def report(student: Agent, teacher: Agent, tasks: Sequence[str], data_obs: Dict[str, np.ndarray],
           pcfg: PlannerConfig, steps: int = 1000, seed: int = 1, num_candidates: int = 128) -> dict:
    """Per task: rank fidelity on the given dataset states (`data_obs[task]`, (S, O)) and on the states of
    one episode of the student's MPPI (as many states, evenly spaced), with that episode's return."""
    out = {}
    for task in tasks:
        ti = teacher.config.task_index(task) if teacher.config.multitask else 0
        d = data_obs[task]
        seen, ret = visited_states(student, task, pcfg, steps, seed)
        pick = np.linspace(0, len(seen) - 1, min(len(d), len(seen))).round().astype(int)
        out[task] = {"data": _summary(rank_fidelity(student, teacher, d, ti, seed, pcfg, num_candidates)),
                     "visited": _summary(rank_fidelity(student, teacher, seen[pick], ti, seed + 1, pcfg,
                                                       num_candidates)),
                     "student_mppi_return": ret, "steps": len(seen)}
    return out
