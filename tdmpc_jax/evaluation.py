"""Batched evaluation: every (task, episode) of a run in lock-step, scores and bootstrap CIs.

Episode i of task T with seed S is the official protocol's episode (env built with `random=S`,
episodes in sequence; see `BatchedEnv.for_episodes`). A DMC task's score is its mean return / 10;
the normalized score is the unweighted mean over tasks. `evaluate(resume_dir=...)` plays the batch in
groups and keeps each finished group, so that an evaluation longer than a sitting (hours of MPPI on a
CPU) resumes; every episode keeps its whole-batch key, so the returns are those of one batch.
"""
from __future__ import annotations

import contextlib
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
from tdmpc_jax.envs.batched import task_dims
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
                 devices=None, rows=None):
    """Play every slot (task, env_seed, episode_index) to the end in lock-step. -> (returns, actions).

    rows: play only these slots (contiguous, aligned to the planner's chunk: `rollout.rows_actor`), each with
    the key it has in the whole batch: the returns the whole batch gives those slots. progress: a bool, or a
    `Progress` bar to advance (one bar over several calls).

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
    if rows is not None:
        actor = rollout.rows_actor(actor, rows, len(slots))
        slots = [slots[i] for i in rows]
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    task_ids = jnp.asarray([cfg.task_index(t) if cfg.multitask else 0 for t, _, _ in slots], jnp.int32)
    n = len(slots)
    actions_log = [] if record_actions else None

    with BatchedEnv.for_episodes(slots, num_workers=num_workers, obs_dim=cfg.obs_dim,
                                 action_dim=cfg.action_dim) as env:
        length = int(env.episode_lengths.max())
        # lock-step steps of all n envs
        bar = progress if isinstance(progress, Progress) else Progress(length, "steps", desc=f"{n} envs  ",
                                                                       enabled=progress)
        steps0 = bar.n

        def hook(t, obs, act, rew, next_obs, done):
            if record_actions:
                actions_log.append(act)
            if on_step is not None:
                on_step(t, obs, act, rew, next_obs, done)
            bar.update()

        with contextlib.nullcontext() if bar is progress else bar:  # a caller's bar stays open
            returns = rollout.rollout(env, actor, params, task_ids, length, rollout.fold_in_keys(seed),
                                      state=planner.init_state(cfg, pcfg, n), on_step=hook, timing=timing,
                                      parts=parts)
        if bar is progress:
            bar.update(length - (bar.n - steps0))  # episodes that ended early: the caller's bar counts `length`
    return returns, (np.stack(actions_log, 1) if record_actions else None)


def params_digest(params) -> str:
    """SHA-256 over a params pytree's leaves (paths, dtypes, shapes, bytes): which agent a partial
    evaluation belongs to."""
    import hashlib
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


class EpisodeGroups:
    """A batch of episodes (slots) played in resumable groups. `directory` holds spec.json (what is played:
    the agent's params digest and the settings; another spec there is an error, nothing is reused or
    removed) and one file per finished group, `episodes-<first>-<last><suffix>`. The groups are contiguous
    rows aligned to the planner's chunk, played with their whole-batch keys (`run_episodes(rows=...)`):
    together they play what one batch plays. Used by `evaluate(resume_dir=...)` and
    `data.collect.collect(resume_dir=...)`."""

    def __init__(self, directory: str, spec: dict, slots: Sequence[tuple], pcfg: PlannerConfig, group: int,
                 suffix: str = ".json"):
        import json
        from tdmpc_jax import atomic
        if group < 1:
            raise ValueError("group must be >= 1")
        align = planner.group_align(pcfg)
        size = -(-group // align) * align
        self.slots, self.directory, self.suffix = list(slots), directory, suffix
        n = len(self.slots)
        self.groups = [np.arange(a, min(a + size, n)) for a in range(0, n, size)]
        spec_path = os.path.join(directory, "spec.json")
        if os.path.exists(spec_path):
            try:
                with open(spec_path) as f:
                    old = json.load(f)
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise ValueError(f"{spec_path}: unreadable ({e}); move it away to start afresh") from None
            if old != spec:
                diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
                raise ValueError(f"{directory}: holds partial episodes with other {', '.join(diff)}; move it away "
                                 "or use another directory")
        else:
            os.makedirs(directory, exist_ok=True)
            atomic.write_file(spec_path, json.dumps(spec, indent=1))

    def path(self, rows) -> str:
        return os.path.join(self.directory, f"episodes-{rows[0]}-{rows[-1]}{self.suffix}")

    def load_error(self, rows, e: Exception) -> ValueError:
        return ValueError(f"{self.path(rows)}: not a finished group of these episodes ({type(e).__name__}: {e})")

    def play(self, agent, pcfg, seed, eval_mode, num_workers, progress, parts, devices, start) -> List[np.ndarray]:
        """Play every missing group, in order, under one progress bar: `start(rows)` -> (on_step hook or None,
        finish(returns, timing, wall_s)) that keeps the group (atomically). -> the groups played now."""
        todo = [g for g in self.groups if not os.path.exists(self.path(g))]
        length = max(task_dims(t)[2] for t in {s[0] for s in self.slots})  # the lock-step loop's length
        bar = Progress(len(self.groups) * length, "steps", desc=f"{len(self.slots)} envs in {len(self.groups)} groups  ",
                       initial=(len(self.groups) - len(todo)) * length, enabled=progress)
        with bar:
            if todo and len(todo) < len(self.groups):
                bar.write(f"resuming: {len(self.groups) - len(todo)} of {len(self.groups)} groups already played")
            for g in todo:
                hook, finish = start(g)
                t0, part = time.perf_counter(), {}
                r, _ = run_episodes(agent, self.slots, pcfg, seed, eval_mode, num_workers, bar, on_step=hook,
                                    timing=part, parts=parts, devices=devices, rows=g)
                part["agent_steps"] = len(g) * part["steps"]
                finish(r, part, time.perf_counter() - t0)
        return todo


def _evaluate_groups(agent, slots, pcfg, seed, eval_mode, num_workers, progress, parts, devices, directory, spec,
                     group, timing):
    """The resumable evaluation (`evaluate(resume_dir=...)`) -> (returns, wall seconds over every sitting)."""
    import json
    from tdmpc_jax import atomic
    store = EpisodeGroups(directory, spec, slots, pcfg, group)

    def start(g):
        def finish(r, part, wall):
            atomic.write_file(store.path(g), json.dumps({"episodes": [list(slots[i]) for i in g],
                                                         "returns": r.tolist(), "wall_s": wall, "timing": part}))
        return None, finish

    store.play(agent, pcfg, seed, eval_mode, num_workers, progress, parts, devices, start)
    returns = np.zeros(len(slots), np.float64)
    wall, tm = 0.0, {}
    for g in store.groups:
        try:
            with open(store.path(g)) as f:
                rec = json.load(f)
            if rec["episodes"] != [list(slots[i]) for i in g]:
                raise ValueError("other episodes")
            r = np.asarray(rec["returns"], np.float64).reshape(len(g))
            if not np.all(np.isfinite(r)):
                raise ValueError("non-finite returns")
            returns[g] = r
            wall += float(rec["wall_s"])
            for k, v in rec["timing"].items():
                tm[k] = tm.get(k, 0) + v
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise store.load_error(g, e) from None
    timing.update(tm)
    return returns, wall


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


RESUME_DIR = "partial"  # under an evaluation's resume_dir: spec.json + one JSON per finished group


def evaluate(agent: Agent, tasks, episodes: int = 10, seed: int = 1, pcfg: Optional[PlannerConfig] = None,
             eval_mode: bool = True, num_workers: int = 0, progress: bool = True, actor=None, parts: int = 1,
             devices=None, resume_dir: Optional[str] = None, group: int = 16) -> dict:
    """Evaluate `episodes` episodes of each task, all batched; returns the results dict (`actor`: a
    `tdmpc_jax.rollout` actor instead of the JAX planner; `parts`, `devices`: see `run_episodes`).

    resume_dir: play the batch in groups of about `group` episodes (rounded up to the planner's chunk) and
    keep each finished group's returns in `resume_dir/partial/`; a killed evaluation called again with the
    same agent and settings plays only the groups that are missing. Every episode acts with the key it has
    in the whole batch: the same returns as one batch (tested; MPPI on a CPU bit for bit, the groups align to
    its planner chunks; the policy prior, which vmaps all problems at once, and accelerators up to float32
    rounding, as `rollout(parts=...)`). Partial results of another agent or other
    settings there are an error, never reused or removed.
    """
    pcfg = pcfg or PlannerConfig()
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    if group < 1:
        raise ValueError("group must be >= 1")
    tasks = resolve_tasks(agent, tasks)
    check_dims(agent, tasks)
    slots = [(t, seed, e) for t in tasks for e in range(episodes)]
    t0 = time.perf_counter()
    timing = {}
    if resume_dir is None:
        returns, _ = run_episodes(agent, slots, pcfg, seed, eval_mode, num_workers, progress, actor=actor,
                                  timing=timing, parts=parts, devices=devices)
        wall = time.perf_counter() - t0
    else:
        if actor is not None:
            raise ValueError("a resumable evaluation plays the JAX planner (actor must be None)")
        spec = {"params_sha256": params_digest(agent.params), "tasks": tasks, "episodes": episodes, "seed": seed,
                "eval_mode": eval_mode, "planner": dataclasses.asdict(pcfg), "group": group,
                "backend": jax.default_backend()}
        returns, wall = _evaluate_groups(agent, slots, pcfg, seed, eval_mode, num_workers, progress, parts,
                                         devices, os.path.join(resume_dir, RESUME_DIR), spec, group, timing)
    per_task = {t: returns[i * episodes:(i + 1) * episodes] for i, t in enumerate(tasks)}
    out = summarize(per_task)
    out.update(checkpoint=str(agent.metadata.get("source", "")), seed=seed, episodes=episodes,
               eval_mode=eval_mode, planner=dataclasses.asdict(pcfg), wall_time_s=wall,
               agent_steps_per_s=timing.get("agent_steps", len(slots) * timing["steps"]) / wall,
               jax_backend=jax.default_backend(),
               timing={"first_step_s (compile included)": timing["act_first_s"], "act_s (plan + transfer)":
                       timing["act_s"], "env_s": timing["env_s"], "hooks_s": timing["hook_s"],
                       "setup_s (envs, params)": wall - timing["act_first_s"] - timing["act_s"]
                       - timing["env_s"] - timing["hook_s"], "lockstep_steps": timing["steps"],
                       "workers": num_workers, "parts": parts, "resumable_groups": resume_dir is not None,
                       "devices": len(devices) if devices is not None else 1})
    return out
