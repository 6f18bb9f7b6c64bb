"""Online TD-MPC2 training: seed with random actions, then act (policy prior or MPPI, with exploration)
in one environment per task, stepping in lock-step, with `utd` updates per environment step.

Follows the official online loop (reference doc §3, §5): seed_steps = max(1000, 5 x episode length)
random steps, then as many updates as seed steps once, then `utd` updates per new step; whole
episodes enter the replay buffer when they end. Checkpoints (train state, buffer, counters: one
directory, swapped in atomically) are written at episode boundaries; a killed run resumes from the last one.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import networks, planner, rollout, runs, train
from tdmpc_jax.agent import Agent
from tdmpc_jax.config import ModelConfig, TrainConfig
from tdmpc_jax.data.replay import ReplayBuffer
from tdmpc_jax.envs import BatchedEnv
from tdmpc_jax.losses import Batch
from tdmpc_jax.progress import Progress
# the run directory (checkpoint I/O, metrics log, lock) lives in tdmpc_jax.runs; these names stay importable here
from tdmpc_jax.runs import as_agent, load_checkpoint, read_log, save_checkpoint  # noqa: F401


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    tasks: Sequence[str]
    episodes: int = 10            # episodes per task (env steps = episodes x episode length)
    seed_steps: int = 0           # 0: official max(1000, 5 x episode length)
    utd: float = 1.0              # updates per environment step (summed over the tasks' envs)
    mpc: bool = False             # act with MPPI instead of the policy prior
    eval_every: int = 1           # evaluate every N episodes (0: never)
    eval_episodes: int = 2
    checkpoint_every: int = 1     # checkpoint every N episodes
    seed: int = 1
    progress: bool = True


def task_config(tasks: Sequence[str], spec: str = "1") -> ModelConfig:
    """A multi-task ModelConfig over registered tasks (`tdmpc_jax.task_registry`: the MT30 tasks and any
    added one), dims padded to the largest among them.

    spec: an official size ('1', '5', ...; task_dim 96) or 'enc,mlp,latent' (task_dim 16)."""
    from tdmpc_jax.config import config_from_spec
    from tdmpc_jax.task_registry import TaskSet, find_task
    bad = [t for t in tasks if find_task(t) is None]
    if bad:
        raise ValueError(f"unknown tasks {bad} (not in tdmpc_jax.task_registry)")
    ts = TaskSet.of(None, tasks)
    base = config_from_spec(spec, None, obs_dim=ts.obs_dim, action_dim=ts.action_dim,
                            task_dim=16 if "," in spec else 96)
    return dataclasses.replace(base, tasks=ts.tasks, obs_dims=ts.obs_dims, action_dims=ts.action_dims,
                               episode_lengths=ts.episode_lengths, model_size=None)


def train_online(cfg: ModelConfig, tcfg: TrainConfig, ocfg: OnlineConfig, out_dir: str) -> Agent:
    """Train (and resume) online; one run per out_dir at a time (a second fails with the holder's pid)."""
    with runs.locked(out_dir, [runs.CHECKPOINT, runs.METRICS],  # what a killed run was writing
                     legacy=[".tmp-state-", ".tmp-buffer-", ".counters.tmp"]):
        return _train_online(cfg, tcfg, ocfg, out_dir)


def _train_online(cfg: ModelConfig, tcfg: TrainConfig, ocfg: OnlineConfig, out_dir: str) -> Agent:
    tasks = list(ocfg.tasks)
    ids = np.asarray([cfg.task_index(t) for t in tasks], np.int32)
    n_env = len(tasks)
    ep_len = max(cfg.episode_lengths)
    seed_steps = ocfg.seed_steps or max(1000, 5 * ep_len)
    state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(ocfg.seed))
    buffer = ReplayBuffer(cfg.obs_dim, cfg.action_dim)
    counters = {"episode": 0, "env_steps": 0, "updates": 0}
    resumed = load_checkpoint(out_dir, state, buffer)
    if resumed is not None:
        state, counters = resumed
        print(f"resuming after episode {counters['episode']} ({counters['env_steps']} env steps)", file=sys.stderr)
    step_fn = train.make_train_step(cfg, tcfg, mesh=train.make_mesh(jax.devices()[:1]))
    pcfg = planner.PlannerConfig(mpc=ocfg.mpc)
    masks = np.asarray(networks.action_masks(cfg))[ids]
    base_key = jax.random.PRNGKey(ocfg.seed)
    t0 = time.perf_counter()
    slots = [(t, ocfg.seed, counters["episode"]) for t in tasks]
    with (BatchedEnv.for_episodes(slots, obs_dim=cfg.obs_dim, action_dim=cfg.action_dim) as env,
          runs.MetricsLog(out_dir, counters["episode"], key="episode",  # drops rows of episodes after the checkpoint
                          tb_step="env_steps") as log,
          Progress(ocfg.episodes * ep_len * n_env, "env steps", initial=counters["env_steps"],
                   enabled=ocfg.progress, smoothing=0.05) as bar):
        plan = rollout.make_actor(cfg, pcfg, eval_mode=False)

        def actor(params, obs, task, plan_state, first, key):  # uniform random actions for the first seed_steps
            gstep = counters["env_steps"]
            if gstep < seed_steps:
                act = np.random.default_rng([ocfg.seed, gstep]).uniform(-1, 1, (n_env, cfg.action_dim))
                return act.astype(np.float32) * masks, plan_state
            return plan(params, obs, task, plan_state, first, key)

        def on_step(t, obs, act, rew, next_obs, done):  # record the step, then the updates it owes
            nonlocal state, metrics
            ep_obs.append(next_obs)
            ep_act.append(act)
            ep_rew.append(rew)
            counters["env_steps"] += n_env
            if buffer.num_episodes and counters["env_steps"] >= seed_steps:
                if counters["updates"] == 0:  # official: one burst of updates on the seed data
                    owed = seed_steps * ocfg.utd
                else:
                    owed = counters.get("owed", 0.0) + n_env * ocfg.utd
                n_up = int(owed)
                counters["owed"] = owed - n_up
                for _ in range(n_up):
                    k = counters["updates"]
                    batch = Batch(*buffer.sample(np.random.default_rng([ocfg.seed, 1, k]), tcfg.batch_size,
                                                 tcfg.horizon))
                    state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, 10 ** 9 + k))
                    counters["updates"] += 1
            if t % 50 == 49:
                bar.set_postfix(episode=f"{counters['episode'] + 1}/{ocfg.episodes}", updates=counters["updates"])
            bar.update(n_env)

        while counters["episode"] < ocfg.episodes:
            obs = env.reset()
            ep_obs, ep_act, ep_rew = [obs], [np.full((n_env, cfg.action_dim), np.nan, np.float32)], \
                [np.full(n_env, np.nan, np.float32)]
            metrics = {}
            rollout.rollout(env, actor, lambda: jax.tree_util.tree_map(jnp.asarray, state.params), ids, ep_len,
                            lambda t: jax.random.fold_in(base_key, counters["env_steps"]),
                            state=planner.init_state(cfg, pcfg, n_env), on_step=on_step, obs=obs, until_done=False)
            o, a, r = np.stack(ep_obs, 1), np.stack(ep_act, 1), np.stack(ep_rew, 1)
            for i in range(n_env):
                buffer.add_episode(o[i], a[i], r[i], int(ids[i]))
            counters["episode"] += 1
            row = {"step": counters["updates"], "episode": counters["episode"], "env_steps": counters["env_steps"],
                   "elapsed_s": time.perf_counter() - t0,
                   **{f"train_return/{t}": float(r[i, 1:].sum()) for i, t in enumerate(tasks)},
                   **{k: float(v) for k, v in metrics.items()}}
            if ocfg.eval_every and counters["episode"] % ocfg.eval_every == 0:
                from tdmpc_jax.evaluation import evaluate
                res = evaluate(as_agent(cfg, state), tasks, ocfg.eval_episodes, ocfg.seed + 1000,
                               planner.PlannerConfig(mpc=False), progress=False)
                row.update({f"eval_return/{t}": v["mean"] for t, v in res["tasks"].items()})
            log.append(row)
            bar.write("  " + "  ".join(f"{k} {v:.0f}" for k, v in row.items() if "return/" in k))
            if counters["episode"] % ocfg.checkpoint_every == 0 or counters["episode"] == ocfg.episodes:
                save_checkpoint(out_dir, state, cfg, tcfg, buffer, counters)
    agent = as_agent(cfg, state)
    agent.save(os.path.join(out_dir, "agent"), trained_steps=int(state.step), env_steps=counters["env_steps"])
    _online_curve(out_dir)
    return agent


def _online_curve(out_dir):
    rows = read_log(os.path.join(out_dir, "metrics.jsonl"))
    series = {k: [r[k] for r in rows if k in r] for k in sorted({k for r in rows for k in r if k.startswith("eval_return/")})}
    if series:
        from tdmpc_jax.plots import learning_curve
        learning_curve([r["env_steps"] for r in rows if any(k in r for k in series)], series,
                       os.path.join(out_dir, "curve.png"), "eval return (policy prior)")
