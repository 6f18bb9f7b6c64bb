"""Offline multi-task training loop (distillation when a teacher is given), resumable exactly.

Every step k uses the sampler rng `default_rng([seed, k])` and the key `fold_in(PRNGKey(seed), k)`,
so a run killed after its checkpoint at step k and resumed gives the same parameters as an
uninterrupted run. Checkpoints are written atomically; a NaN loss stops the run and leaves the last
good checkpoint as it was.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import atomic, runs, train
from tdmpc_jax.agent import Agent
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.config import ModelConfig, TrainConfig
from tdmpc_jax.data.dataset import Dataset
from tdmpc_jax.losses import Batch
from tdmpc_jax.progress import Progress
# the run directory (checkpoint I/O, metrics log) lives in tdmpc_jax.runs; these names stay importable from here
from tdmpc_jax.runs import as_agent, load_state, read_log, read_state, save_state, write_state  # noqa: F401


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 1000
    seed: int = 1
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0
    eval_tasks: Sequence[str] = ()
    eval_episodes: int = 2
    progress: bool = True


def check_teacher(student: ModelConfig, teacher: ModelConfig):
    if student.tasks != teacher.tasks:
        raise ValueError("teacher and student have different task sets")
    if (student.obs_dim, student.action_dim) != (teacher.obs_dim, teacher.action_dim):
        raise ValueError(f"teacher obs/action dims {(teacher.obs_dim, teacher.action_dim)} differ from the "
                         f"student's {(student.obs_dim, student.action_dim)}")


def train_offline(cfg: ModelConfig, tcfg: TrainConfig, dataset: Dataset, out_dir: str, run: RunConfig,
                  teacher: Optional[Agent] = None, init: Optional[Agent] = None):
    """Train (and resume) a student; writes out_dir/{train_state, agent, metrics.csv, metrics.jsonl, curve.png}
    (and TensorBoard events when a writer is installed, see tdmpc_jax.runs).

    One run per out_dir at a time (atomic.RunLock); a second one fails with the holder's pid."""
    with runs.locked(out_dir, [runs.TRAIN_STATE, runs.METRICS, "metrics.csv"], legacy=[".tmp-state-"]):
        return _train_offline(cfg, tcfg, dataset, out_dir, run, teacher, init)


def _train_offline(cfg, tcfg, dataset, out_dir, run, teacher, init):
    dataset.check_compatible(cfg, "student")
    t_params, t_cfg = None, None
    if tcfg.uses_teacher:
        if teacher is None:
            raise ValueError("distillation coefficients > 0 need --teacher")
        check_teacher(cfg, teacher.config)
        dataset.check_compatible(teacher.config, "teacher")
        t_params = jax.tree_util.tree_map(jnp.asarray, teacher.params)
        t_cfg = teacher.config
    if init is not None:
        state = train.init_train_state(cfg, tcfg, params=init.params, target_qs=init.target_qs)
    else:
        state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(run.seed))
    resumed = load_state(out_dir, state)
    start = 0
    if resumed is not None:
        state, meta = resumed
        if ModelConfig.from_dict(meta.get("config", {})) != cfg:
            raise CheckpointError(runs.state_dir(out_dir), "was written for another student architecture")
        start = int(meta["step"])
        print(f"resuming from step {start}", file=sys.stderr)
    step_fn = train.make_train_step(cfg, tcfg, t_cfg)
    base_key = jax.random.PRNGKey(run.seed)
    with runs.MetricsLog(out_dir, start) as log, \
            Progress(run.steps, "updates", initial=start, enabled=run.progress) as bar:
        t0, last_good = time.perf_counter(), start
        for k in range(start, run.steps):
            rng = np.random.default_rng([run.seed, k])
            batch = Batch(*dataset.sample(rng, tcfg.batch_size, tcfg.horizon))
            state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, k), t_params)
            done = k + 1
            if done % run.log_every == 0 or done == run.steps:
                m = {key: float(v) for key, v in metrics.items()}
                if not all(np.isfinite(v) for v in m.values()):
                    raise FloatingPointError(f"non-finite loss at step {done}; the last good checkpoint "
                                             f"(step {last_good}) in {out_dir} is intact")
                m["step"] = done
                m["elapsed_s"] = time.perf_counter() - t0
                log.append(m)
                bar.set_postfix(loss=f"{m['total_loss']:.4f}")
            bar.update()
            if run.eval_every and done % run.eval_every == 0 and run.eval_tasks:
                from tdmpc_jax.evaluation import evaluate
                from tdmpc_jax.planner import PlannerConfig
                res = evaluate(as_agent(cfg, state), run.eval_tasks, run.eval_episodes, run.seed,
                               PlannerConfig(mpc=False), progress=False)
                log.append({"step": done, "eval_normalized_score": res["normalized_score"]})
            if done % run.checkpoint_every == 0 or done == run.steps:
                save_state(out_dir, state, cfg, tcfg)
                last_good = done
    agent = as_agent(cfg, state)
    agent.save(os.path.join(out_dir, "agent"), trained_steps=int(state.step))
    write_curves(out_dir)
    return agent, state


def write_curves(out_dir):
    """metrics.csv and curve.png from metrics.jsonl."""
    rows = read_log(os.path.join(out_dir, runs.METRICS))
    train_rows = [r for r in rows if "total_loss" in r]
    if not train_rows:
        return
    keys = sorted({k for r in train_rows for k in r})

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(train_rows)
    atomic.write_file(os.path.join(out_dir, "metrics.csv"), writer=write_csv)
    from tdmpc_jax.plots import learning_curve
    series = {k: [r[k] for r in train_rows] for k in keys if k.endswith("_loss") or k.startswith("distill_")}
    learning_curve([r["step"] for r in train_rows], series, os.path.join(out_dir, "curve.png"), "loss")
