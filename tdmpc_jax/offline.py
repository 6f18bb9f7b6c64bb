"""Offline multi-task training loop (distillation when a teacher is given), resumable exactly.

Every step k uses the sampler rng `default_rng([seed, k])` and the key `fold_in(PRNGKey(seed), k)`,
so a run killed after its checkpoint at step k and resumed gives the same parameters as an
uninterrupted run. Checkpoints are written atomically; a NaN loss stops the run and leaves the last
good checkpoint as it was.

Weight averaging (`RunConfig.average_from`, `average_window`; not in the official code, which plans
with the last update's weights): the run's agent is the mean of the weights after a few evenly spaced
late updates. The raw weights keep training (the train state holds them, and the sum of the snapshots
so far for an exact resume). Why: make distill's student scored 52.7, 40.9 and 42.2 after updates
2500, 2750 and 3000 of one run, and 54.0 as the mean of five snapshots (docs/distillation.md, "Weight averaging").
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
    # weight averaging (SWA, Izmailov et al. 2018): the run's agent is the mean of the {params,
    # target_qs} snapshots after updates average_from, average_from + average_every, ... (0: the last
    # update's weights); the raw weights stay in the train state
    average_from: int = 0
    average_every: int = 0
    # updates per jitted call (`train.make_train_steps`, one lax.scan): a block ends early wherever the
    # host must see the state (a log, checkpoint, evaluation or averaging step, the last update), so
    # the steps, checkpoints and resumes are those of block=1; the arithmetic equals single steps
    # (tested). For accelerators, where dispatch and the host round trip dominate small updates.
    block: int = 1

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.average_from < 0 or (self.average_from and self.average_every < 1):
            raise ValueError(f"weight averaging needs average_from >= 0 and average_every >= 1, got "
                             f"{self.average_from} and {self.average_every}")

    def snapshots(self, step: int) -> int:
        """How many weight snapshots are averaged after `step` updates."""
        if not self.average_from or step < self.average_from:
            return 0
        return (step - self.average_from) // self.average_every + 1

    def next_stop(self, step: int) -> int:
        """The first update after `step` at whose end the host needs the state (log, checkpoint,
        evaluation, weight snapshot, or the last update)."""
        stops = [self.steps]
        for every in (self.log_every, self.checkpoint_every, self.eval_every if self.eval_tasks else 0):
            if every:
                stops.append((step // every + 1) * every)
        if self.average_from:
            stops.append(self.average_from if step < self.average_from else
                         self.average_from + (self.snapshots(step)) * self.average_every)
        return min(stops)


def average_window(steps: int, last: float, snapshots: int) -> dict:
    """RunConfig weight-averaging fields for `snapshots` snapshots spread evenly over the last fraction
    `last` of `steps` updates, the final update included (last = 0: none). 3,000 updates, last 1/3, 5
    snapshots: after updates 2000, 2250, 2500, 2750 and 3000."""
    if not last:
        return dict(average_from=0, average_every=0)
    if not 0 < last < 1 or snapshots < 1:
        raise ValueError(f"weight averaging needs 0 <= last < 1 and snapshots >= 1, got {last} and {snapshots}")
    window = round(steps * last)
    if snapshots > 1 and window < snapshots - 1:
        raise ValueError(f"{snapshots} snapshots do not fit in the last {window} of {steps} updates")
    every = window // (snapshots - 1) if snapshots > 1 else 1
    return dict(average_from=steps - every * (snapshots - 1), average_every=every)


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
    averaging = [run.average_from, run.average_every] if run.average_from else None
    if averaging:  # the snapshot sum travels with the train state (exact resume)
        state = state._replace(average=jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32),
                                                              train.weights(state)))
    resumed = load_state(out_dir, state)
    start = 0
    if resumed is not None:
        state, meta = resumed
        if ModelConfig.from_dict(meta.get("config", {})) != cfg:
            raise CheckpointError(runs.state_dir(out_dir), "was written for another student architecture")
        if meta.get("average") != averaging:
            raise CheckpointError(runs.state_dir(out_dir), f"was written with weight averaging "
                                  f"{meta.get('average')} (from, every), not {averaging}")
        start = int(meta["step"])
        print(f"resuming from step {start}", file=sys.stderr)
    step_fn = train.make_train_step(cfg, tcfg, t_cfg)
    block_fn = train.make_train_steps(cfg, tcfg, t_cfg, block=run.block) if run.block > 1 else None
    average, state = state.average, state._replace(average=None)
    average = None if average is None else jax.tree_util.tree_map(np.asarray, average)  # host sums: exact resume
    extra = {"average": averaging} if averaging else None
    base_key = jax.random.PRNGKey(run.seed)
    fold_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
    sample = lambda k: Batch(*dataset.sample(np.random.default_rng([run.seed, k]), tcfg.batch_size, tcfg.horizon))
    with runs.MetricsLog(out_dir, start) as log, \
            Progress(run.steps, "updates", initial=start, enabled=run.progress) as bar:
        t0, last_good, k = time.perf_counter() - log.elapsed(), start, start  # elapsed_s: across resumes
        while k < run.steps:
            n = min(run.block, run.next_stop(k) - k)
            if n == run.block and block_fn is not None:  # updates k .. k+n-1 in one call
                batches = Batch(*(np.stack(x) for x in zip(*(sample(j) for j in range(k, k + n)))))
                state, metrics = block_fn(state, batches, fold_keys(base_key, jnp.arange(k, k + n)), t_params)
                metrics = {key: v[-1] for key, v in metrics.items()}
            else:
                for j in range(k, k + n):
                    state, metrics = step_fn(state, sample(j), jax.random.fold_in(base_key, j), t_params)
            k = done = k + n
            if run.snapshots(done) > run.snapshots(done - n):
                average = jax.tree_util.tree_map(lambda a, x: a + np.asarray(x), average, train.weights(state))
            if done % run.log_every == 0 or done == run.steps:
                m = {key: float(v) for key, v in metrics.items()}
                if not all(np.isfinite(v) for v in m.values()):
                    raise FloatingPointError(f"non-finite loss at step {done}; the last good checkpoint "
                                             f"(step {last_good}) in {out_dir} is intact")
                m["step"] = done
                m["elapsed_s"] = time.perf_counter() - t0
                log.append(m)
                bar.set_postfix(loss=f"{m['total_loss']:.4f}")
            bar.update(n)
            if run.eval_every and done % run.eval_every == 0 and run.eval_tasks:
                from tdmpc_jax.evaluation import evaluate
                from tdmpc_jax.planner import PlannerConfig
                res = evaluate(as_agent(cfg, state), run.eval_tasks, run.eval_episodes, run.seed,
                               PlannerConfig(mpc=False), progress=False)
                log.append({"step": done, "eval_normalized_score": res["normalized_score"]})
            if done % run.checkpoint_every == 0 or done == run.steps:
                save_state(out_dir, state._replace(average=average), cfg, tcfg, extra)
                last_good = done
    n = run.snapshots(int(state.step))
    if n:
        mean = jax.tree_util.tree_map(lambda a: a / np.float32(n), average)
        agent = Agent(cfg, mean["params"], mean["target_qs"],
                      {"trained_steps": int(state.step), "averaged_snapshots": n})
    else:
        agent = as_agent(cfg, state)
    agent.save(os.path.join(out_dir, "agent"))
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
