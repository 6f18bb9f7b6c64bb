"""The run directory of a training run (offline `train_offline`, online `train_online`): one place for

* the train state: `write_state` / `read_state` (an Orbax checkpoint with checksums), saved and restored
  crash-safely (`tdmpc_jax.atomic`) as DIR/train_state (`save_state` / `load_state`, offline) or inside
  DIR/checkpoint with the replay buffer and counters, swapped as ONE unit (`save_checkpoint` /
  `load_checkpoint`, online);
* the metrics log DIR/metrics.jsonl (`MetricsLog`): one JSON row per line, appended; a torn last line (a kill
  while appending) is tolerated (`read_log`), and on resume the rows past the checkpoint are dropped
  (`truncate_log`). When tensorboardX (or the `tensorboard` package) is importable the same rows are also
  written as TensorBoard scalars to DIR/events.out.tfevents.* (`tensorboard --logdir DIR`); rows a resume
  dropped are purged there too. Neither package is required: without one only the JSONL is written;
* the run lock: `locked(DIR, ...)`, one run per directory (`atomic.RunLock`), clearing what a killed
  writer left behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import atomic, train
from tdmpc_jax.agent import Agent
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.config import ModelConfig, TrainConfig

TRAIN_STATE = "train_state"   # offline: DIR/train_state
CHECKPOINT = "checkpoint"     # online: DIR/checkpoint/{train_state, buffer.npz, counters.json}
METRICS = "metrics.jsonl"
TB_EVENTS = "events.out.tfevents."


@contextlib.contextmanager
def locked(out_dir, writes: Sequence[str], legacy: Sequence[str] = ()):
    """`with locked(DIR, names):` exclusive use of run directory DIR (created if needed; a second run fails
    with the holder's pid), after deleting what a killed writer of `names` (or `legacy` prefixes) left."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic.RunLock(out_dir):
        atomic.remove_stale(out_dir, list(writes), legacy=list(legacy))
        yield


# --- train state -------------------------------------------------------------------------------

def state_dir(out_dir) -> str:
    return os.path.join(os.path.abspath(out_dir), TRAIN_STATE)


def checkpoint_dir(out_dir) -> str:
    return os.path.join(os.path.abspath(out_dir), CHECKPOINT)


def write_state(path, state: train.TrainState, cfg: ModelConfig, tcfg: TrainConfig, extra=None):
    """Write the train state (any TrainState fields) as an Orbax checkpoint at the new path `path`."""
    import orbax.checkpoint as ocp
    from tdmpc_jax.checkpoints.orbax_io import CHECKSUM_KEY, _checkpointer, array_checksums
    _, ck = _checkpointer()
    tree = jax.tree_util.tree_map(np.asarray, _fields(state))
    meta = {"format": "tdmpc_jax-train-state", "step": int(state.step), "config": cfg.to_dict(),
            "train_config": dataclasses.asdict(tcfg), **(extra or {}), CHECKSUM_KEY: array_checksums(tree)}
    ck.save(path, ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree),
        metadata=ocp.args.JsonSave(meta)))


def _fields(state: train.TrainState) -> dict:
    """The saved fields: those set (a state without weight averaging has the layout of older versions)."""
    return {k: v for k, v in state._asdict().items() if v is not None}


def _restore_meta(path):
    import orbax.checkpoint as ocp
    from tdmpc_jax.checkpoints.orbax_io import _checkpointer
    _, ck = _checkpointer()
    return ck.restore(os.path.abspath(path), ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def read_state_meta(path) -> dict:
    """The metadata (JSON only: step, config, train config) of `write_state`'s checkpoint at `path`, without
    reading its arrays; CheckpointError when it is not one."""
    try:
        meta = _restore_meta(path)
    except Exception as e:
        raise CheckpointError(path, f"not a train state: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != "tdmpc_jax-train-state" or \
            not isinstance(meta.get("step"), int):
        raise CheckpointError(path, "not a train state (its metadata has no format 'tdmpc_jax-train-state' and step)")
    return meta


def read_state(path, like: train.TrainState):
    """-> (state, meta) from `write_state`'s checkpoint at `path`; CheckpointError when corrupt."""
    import orbax.checkpoint as ocp
    from tdmpc_jax.checkpoints.orbax_io import _checkpointer
    _, ck = _checkpointer()
    try:
        # the saved layout: a weight-averaging sum (meta "average", see offline.RunConfig) or none, whatever
        # `like` asks for; the caller compares meta["average"] with its own run's
        saved = _restore_meta(path)
        averaged = isinstance(saved, dict) and bool(saved.get("average"))
        like = like._replace(average=train.weights(like) if averaged else None)
        item = jax.tree_util.tree_map(np.asarray, _fields(like))
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
    atomic.replace_dir(state_dir(out_dir), lambda path: write_state(path, state, cfg, tcfg, extra))


def load_state(out_dir, like: train.TrainState):
    """-> (state, meta) or None when there is no checkpoint; errors on a corrupt one."""
    target = state_dir(out_dir)
    if not atomic.recover_dir(target):  # finishes or rolls back a save that was killed
        return None
    return read_state(target, like)


def save_checkpoint(out_dir, state, cfg: ModelConfig, tcfg: TrainConfig, buffer, counters: dict):
    """out_dir/checkpoint/{train_state, buffer.npz, counters.json}, replaced as ONE unit (tdmpc_jax.atomic)."""
    def build(path):
        os.makedirs(path)
        write_state(os.path.join(path, TRAIN_STATE), state, cfg, tcfg, {"online": True})
        np.savez(os.path.join(path, "buffer.npz"), **buffer.state_dict())
        with open(os.path.join(path, "counters.json"), "w") as f:
            json.dump(counters, f)
    atomic.replace_dir(checkpoint_dir(out_dir), build)


def load_checkpoint(out_dir, like, buffer):
    """-> (state, counters) of the last `save_checkpoint` (loading `buffer` in place), or None."""
    path = checkpoint_dir(out_dir)
    if not atomic.recover_dir(path):  # finishes or rolls back a save that was killed
        legacy = os.path.join(os.path.abspath(out_dir), "counters.json")  # runs of older versions
        if not (os.path.exists(legacy) and atomic.recover_dir(state_dir(out_dir))):
            return None
        path = os.path.abspath(out_dir)
    state, _ = read_state(os.path.join(path, TRAIN_STATE), like)
    try:
        with open(os.path.join(path, "counters.json")) as f:
            counters = json.load(f)
        with np.load(os.path.join(path, "buffer.npz")) as d:
            buffer.load_state_dict(dict(d))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(path, f"cannot resume: {type(e).__name__}: {str(e)[:200]}") from None
    return state, counters


def as_agent(cfg: ModelConfig, state: train.TrainState) -> Agent:
    """The `Agent` (host arrays) of a train state, as saved to DIR/agent."""
    return Agent(cfg, jax.tree_util.tree_map(np.asarray, state.params),
                 jax.tree_util.tree_map(np.asarray, state.target_qs), {"trained_steps": int(state.step)})


# --- metrics log -------------------------------------------------------------------------------

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


def truncate_log(path, step, key="step"):
    """Drop log rows past `step` (a run killed before checkpointing them) and a torn last line; atomic."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_log(path) if r.get(key, 0) <= step]
    atomic.write_file(path, "".join(json.dumps(r) + "\n" for r in keep))


class _TensorboardPackageWriter:
    """`add_scalar`/`close` over the `tensorboard` package's own event writer (no TensorFlow needed)."""

    def __init__(self, logdir, purge_step, flush_secs, filename_suffix):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._event, self._summary = event_pb2, summary_pb2
        self._w = EventFileWriter(logdir, flush_secs=flush_secs, filename_suffix=filename_suffix)
        if purge_step is not None:
            self._w.add_event(event_pb2.Event(step=purge_step, wall_time=time.time(), session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))

    def add_scalar(self, tag, value, step):
        s = self._summary.Summary(value=[self._summary.Summary.Value(tag=tag, simple_value=value)])
        self._w.add_event(self._event.Event(step=step, wall_time=time.time(), summary=s))

    def close(self):
        self._w.close()


def tensorboard_writer(logdir, purge_step: Optional[int] = None, flush_secs: int = 30):
    """A TensorBoard scalar writer (`add_scalar(tag, value, step)`, `close()`) for `logdir`: tensorboardX's,
    else the `tensorboard` package's; None when neither is installed. Events with step >= purge_step, from
    earlier writers into `logdir`, are hidden (a resumed run's redone steps)."""
    suffix = f".{time.time_ns()}"  # a writer opens its file with "wb": never two writers on one name
    try:
        from tensorboardX import SummaryWriter
    except Exception:  # not installed (ImportError), or an install that cannot load (e.g. its protobuf)
        pass
    else:
        return SummaryWriter(logdir, purge_step=purge_step, flush_secs=flush_secs, filename_suffix=suffix)
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401  (loadable without TensorFlow?)
        from tensorboard.summary.writer import event_file_writer  # noqa: F401
    except Exception:
        return None
    return _TensorboardPackageWriter(logdir, purge_step, flush_secs, suffix)


class MetricsLog:
    """DIR/metrics.jsonl, and TensorBoard scalars in DIR when a writer is installed (`tensorboard_writer`).

    Opening it resumes the log: rows whose `key` is past `upto` (logged after the checkpoint being resumed)
    and a torn last line are dropped, and so are their TensorBoard events. `tb_step` names the row field
    used as the TensorBoard step. Use it as a context manager (closes the event file)."""

    def __init__(self, out_dir, upto, key: str = "step", tb_step: str = "step", tensorboard: bool = True):
        self.path = os.path.join(out_dir, METRICS)
        truncate_log(self.path, upto, key)
        self.tb_step = tb_step
        self._tb = None
        if tensorboard:
            kept = [r[tb_step] for r in read_log(self.path) if isinstance(r.get(tb_step), (int, float))]
            resumed = glob.glob(os.path.join(out_dir, TB_EVENTS + "*"))  # events of earlier (killed) runs
            self._tb = tensorboard_writer(out_dir, purge_step=(int(max(kept)) + 1 if kept else 0) if resumed else None)

    def append(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None and self.tb_step in row:
            step = int(row[self.tb_step])
            for k, v in row.items():
                if k != self.tb_step and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, float(v), step)

    def rows(self):
        return read_log(self.path)

    def elapsed(self, key: str = "elapsed_s") -> float:
        """The last kept row's `key` (0 when none): a resumed run adds its own seconds to it, so that
        elapsed_s counts the time of the kept updates across resumes (and machines), not since the last one."""
        kept = [r[key] for r in self.rows() if isinstance(r.get(key), (int, float))]
        return float(kept[-1]) if kept else 0.0

    def close(self):
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
