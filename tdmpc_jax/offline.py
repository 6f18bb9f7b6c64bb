"""Offline multi-task training loop (distillation when a teacher is given), resumable exactly.

Every step k uses the sampler rng `default_rng([seed, k])` and the key `fold_in(PRNGKey(seed), k)`,
so a run killed after its checkpoint at step k and resumed gives the same parameters as an
uninterrupted run. Checkpoints are written atomically; a NaN loss stops the run and leaves the last
good checkpoint as it was.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import atomic, train
from tdmpc_jax.agent import Agent
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.config import ModelConfig, TrainConfig
from tdmpc_jax.data.dataset import Dataset
from tdmpc_jax.losses import Batch


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


def _ckpt_dir(out_dir):
    return os.path.join(os.path.abspath(out_dir), "train_state")


def write_state(path, state: train.TrainState, cfg: ModelConfig, tcfg: TrainConfig, extra=None):
    """Write the train state (any TrainState fields) as an Orbax checkpoint at the new path `path`."""
    import orbax.checkpoint as ocp
    from tdmpc_jax.checkpoints.orbax_io import CHECKSUM_KEY, _checkpointer, array_checksums
    _, ck = _checkpointer()
    tree = jax.tree_util.tree_map(np.asarray, state._asdict())
    meta = {"format": "tdmpc_jax-train-state", "step": int(state.step), "config": cfg.to_dict(),
            "train_config": dataclasses.asdict(tcfg), **(extra or {}), CHECKSUM_KEY: array_checksums(tree)}
    ck.save(path, ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree),
        metadata=ocp.args.JsonSave(meta)))


def read_state(path, like: train.TrainState):
    """-> (state, meta) from `write_state`'s checkpoint at `path`; CheckpointError when corrupt."""
    import orbax.checkpoint as ocp
    from tdmpc_jax.checkpoints.orbax_io import _checkpointer
    _, ck = _checkpointer()
    try:
        item = jax.tree_util.tree_map(np.asarray, like._asdict())
        r = ck.restore(path, ocp.args.Composite(state=ocp.args.PyTreeRestore(item=item),
                                                metadata=ocp.args.JsonRestore()))
        restored = r["state"]
        flat = jax.tree_util.tree_leaves(restored)
        leaves = jax.tree_util.tree_leaves(item)
        if len(flat) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(flat, leaves)):
            raise ValueError("state does not match the model/optimizer structure")
        state = train.TrainState(**jax.tree_util.tree_map(jnp.asarray, restored))
    except Exception as e:
        raise CheckpointError(path, f"cannot resume: {type(e).__name__}: {str(e)[:200]}") from None
    from tdmpc_jax.checkpoints.orbax_io import CHECKSUM_KEY, verify_checksums
    meta = r["metadata"] if isinstance(r["metadata"], dict) else {}
    verify_checksums(path, restored, meta.get(CHECKSUM_KEY))  # states saved without checksums: unverified
    return state, r["metadata"]


def save_state(out_dir, state: train.TrainState, cfg: ModelConfig, tcfg: TrainConfig, extra=None):
    """Replace out_dir/train_state atomically (recoverable from a kill at any point, see tdmpc_jax.atomic)."""
    atomic.replace_dir(_ckpt_dir(out_dir), lambda path: write_state(path, state, cfg, tcfg, extra))


def load_state(out_dir, like: train.TrainState):
    """-> (state, meta) or None when there is no checkpoint; errors on a corrupt one."""
    target = _ckpt_dir(out_dir)
    if not atomic.recover_dir(target):  # finishes or rolls back a save that was killed
        return None
    return read_state(target, like)


def train_offline(cfg: ModelConfig, tcfg: TrainConfig, dataset: Dataset, out_dir: str, run: RunConfig,
                  teacher: Optional[Agent] = None, init: Optional[Agent] = None):
    """Train (and resume) a student; writes out_dir/{train_state, agent, metrics.csv, metrics.jsonl, curve.png}.

    One run per out_dir at a time (atomic.RunLock); a second one fails with the holder's pid."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic.RunLock(out_dir):
        atomic.remove_stale(out_dir, ["train_state", "metrics.jsonl", "metrics.csv"], legacy=[".tmp-state-"])
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
            raise CheckpointError(_ckpt_dir(out_dir), "was written for another student architecture")
        start = int(meta["step"])
        print(f"resuming from step {start}", file=sys.stderr)
    step_fn = train.make_train_step(cfg, tcfg, t_cfg)
    base_key = jax.random.PRNGKey(run.seed)
    log_path = os.path.join(out_dir, "metrics.jsonl")
    _truncate_log(log_path, start)
    history, t0, last_good = [], time.perf_counter(), start
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
            with open(log_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            history.append(m)
            if run.progress:
                rate = (done - start) / max(m["elapsed_s"], 1e-9)
                print(f"\r  step {done}/{run.steps}  {rate:6.1f} updates/s  ETA {(run.steps - done) / rate:6.0f}s  "
                      f"loss {m['total_loss']:.4f}", end="", file=sys.stderr, flush=True)
        if run.eval_every and done % run.eval_every == 0 and run.eval_tasks:
            from tdmpc_jax.evaluation import evaluate
            from tdmpc_jax.planner import PlannerConfig
            res = evaluate(as_agent(cfg, state), run.eval_tasks, run.eval_episodes, run.seed,
                           PlannerConfig(mpc=False), progress=False)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": done, "eval_normalized_score": res["normalized_score"]}) + "\n")
        if done % run.checkpoint_every == 0 or done == run.steps:
            save_state(out_dir, state, cfg, tcfg)
            last_good = done
    if run.progress:
        print(file=sys.stderr)
    agent = as_agent(cfg, state)
    agent.save(os.path.join(out_dir, "agent"), trained_steps=int(state.step))
    write_curves(out_dir)
    return agent, state


def as_agent(cfg, state) -> Agent:
    return Agent(cfg, jax.tree_util.tree_map(np.asarray, state.params),
                 jax.tree_util.tree_map(np.asarray, state.target_qs), {"trained_steps": int(state.step)})


def read_log(path):
    """Rows of a metrics.jsonl; a torn last line (a kill during its append) is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [l for l in f.read().split("\n") if l.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # torn by a kill while appending: the step it logged is redone on resume
            raise ValueError(f"{path}: corrupt line {i + 1}: {e}") from None
    return rows


def _truncate_log(path, step, key="step"):
    """Drop log rows past `step` (a run killed before checkpointing them) and a torn last line; atomic."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_log(path) if r.get(key, 0) <= step]
    atomic.write_file(path, "".join(json.dumps(r) + "\n" for r in keep))


def write_curves(out_dir):
    """metrics.csv and curve.png from metrics.jsonl."""
    rows = read_log(os.path.join(out_dir, "metrics.jsonl"))
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
