"""Online TD-MPC2 training: seed with random actions, then act (policy prior or MPPI, with exploration)
in one environment per task, stepping in lock-step, with `utd` updates per environment step.

Follows the official online loop (reference doc §3, §5): seed_steps = max(1000, 5 x episode length)
random steps, then as many updates as seed steps once, then `utd` updates per new step; whole
episodes enter the replay buffer when they end. Checkpoints (train state, buffer, counters: one
directory, swapped in atomically) are written at episode boundaries; a killed run resumes from the last one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import atomic, planner, train
from tdmpc_jax.agent import Agent
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.config import ModelConfig, TrainConfig
from tdmpc_jax.data.replay import ReplayBuffer
from tdmpc_jax.envs import BatchedEnv
from tdmpc_jax.losses import Batch
from tdmpc_jax.offline import _truncate_log, as_agent, read_log, read_state, write_state


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
    """A multi-task ModelConfig over MT30 tasks (dims padded to the largest among them).

    spec: an official size ('1', '5', ...; task_dim 96) or 'enc,mlp,latent' (task_dim 16)."""
    from tdmpc_jax.config import MT30_TASKS, config_from_spec, get_task_set
    ts = get_task_set("mt30")
    bad = [t for t in tasks if t not in MT30_TASKS]
    if bad:
        raise ValueError(f"unknown MT30 tasks {bad}")
    idx = [ts.index(t) for t in tasks]
    obs_dims = tuple(ts.obs_dims[i] for i in idx)
    act_dims = tuple(ts.action_dims[i] for i in idx)
    base = config_from_spec(spec, None, obs_dim=max(obs_dims), action_dim=max(act_dims),
                            task_dim=16 if "," in spec else 96)
    return dataclasses.replace(base, tasks=tuple(tasks), obs_dims=obs_dims, action_dims=act_dims,
                               episode_lengths=tuple(ts.episode_lengths[i] for i in idx), model_size=None)


def _ckpt_dir(out_dir):
    return os.path.join(os.path.abspath(out_dir), "checkpoint")


def save_checkpoint(out_dir, state, cfg: ModelConfig, tcfg: TrainConfig, buffer: ReplayBuffer, counters: dict):
    """out_dir/checkpoint/{train_state, buffer.npz, counters.json}, replaced as ONE unit (tdmpc_jax.atomic)."""
    def build(path):
        os.makedirs(path)
        write_state(os.path.join(path, "train_state"), state, cfg, tcfg, {"online": True})
        np.savez(os.path.join(path, "buffer.npz"), **buffer.state_dict())
        with open(os.path.join(path, "counters.json"), "w") as f:
            json.dump(counters, f)
    atomic.replace_dir(_ckpt_dir(out_dir), build)


def load_checkpoint(out_dir, like, buffer: ReplayBuffer):
    """-> (state, counters) of the last checkpoint (loading `buffer` in place), or None."""
    path = _ckpt_dir(out_dir)
    if not atomic.recover_dir(path):  # finishes or rolls back a save that was killed
        legacy = os.path.join(os.path.abspath(out_dir), "counters.json")  # runs of older versions
        if not (os.path.exists(legacy) and atomic.recover_dir(os.path.join(out_dir, "train_state"))):
            return None
        path = os.path.abspath(out_dir)
    state, _ = read_state(os.path.join(path, "train_state"), like)
    try:
        with open(os.path.join(path, "counters.json")) as f:
            counters = json.load(f)
        with np.load(os.path.join(path, "buffer.npz")) as d:
            buffer.load_state_dict(dict(d))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(path, f"cannot resume: {type(e).__name__}: {str(e)[:200]}") from None
    return state, counters


def train_online(cfg: ModelConfig, tcfg: TrainConfig, ocfg: OnlineConfig, out_dir: str) -> Agent:
    """Train (and resume) online; one run per out_dir at a time (a second fails with the holder's pid)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic.RunLock(out_dir):
        atomic.remove_stale(out_dir, ["checkpoint", "metrics.jsonl"],  # what a killed run was writing
                            legacy=[".tmp-state-", ".tmp-buffer-", ".counters.tmp"])
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
    masks = np.asarray([[1.0] * d + [0.0] * (cfg.action_dim - d) for d in cfg.action_dims], np.float32)[ids]
    log_path = os.path.join(out_dir, "metrics.jsonl")
    _truncate_log(log_path, counters["episode"], key="episode")  # rows of episodes after the checkpoint
    base_key = jax.random.PRNGKey(ocfg.seed)
    t0 = time.perf_counter()
    slots = [(t, ocfg.seed, counters["episode"]) for t in tasks]
    with BatchedEnv.for_episodes(slots, obs_dim=cfg.obs_dim, action_dim=cfg.action_dim) as env:
        while counters["episode"] < ocfg.episodes:
            obs = env.reset()
            ep_obs, ep_act, ep_rew = [obs], [np.full((n_env, cfg.action_dim), np.nan, np.float32)], \
                [np.full(n_env, np.nan, np.float32)]
            plan_state = planner.init_state(cfg, pcfg, n_env)
            metrics = {}
            for t in range(ep_len):
                gstep = counters["env_steps"]
                rng = np.random.default_rng([ocfg.seed, gstep])
                if gstep < seed_steps:
                    act = rng.uniform(-1, 1, (n_env, cfg.action_dim)).astype(np.float32) * masks
                else:
                    act, plan_state = planner.act_batch(cfg, pcfg, jax.tree_util.tree_map(jnp.asarray, state.params),
                                                        jnp.asarray(obs), jnp.asarray(ids), plan_state,
                                                        jnp.full((n_env,), t == 0),
                                                        jax.random.fold_in(base_key, gstep), False)
                    act = np.asarray(act)
                obs, rew, done = env.step(act)
                ep_obs.append(obs)
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
                if ocfg.progress and t % 50 == 49:
                    el = time.perf_counter() - t0
                    print(f"\r  episode {counters['episode'] + 1}/{ocfg.episodes}  env steps {counters['env_steps']}  "
                          f"updates {counters['updates']}  {el:6.0f}s", end="", file=sys.stderr, flush=True)
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
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if ocfg.progress:
                print("\n  " + "  ".join(f"{k} {v:.0f}" for k, v in row.items() if "return/" in k),
                      file=sys.stderr, flush=True)
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
