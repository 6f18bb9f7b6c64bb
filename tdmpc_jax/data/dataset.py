"""On-disk multi-task dataset: raw memory-mapped arrays plus meta.json, written atomically.

Layout of a dataset directory:
  meta.json   {"format", "version", "num_steps", "num_episodes", "obs_dim", "action_dim", "tasks", ...}
  obs.bin     float32 (N, obs_dim)       obs_t (zero-padded to obs_dim)
  action.bin  float32 (N, action_dim)    the action that LED to obs_t (entry 0 of an episode: filler)
  reward.bin  float32 (N,)               the reward that led to obs_t (entry 0: filler, may be NaN)
  task.bin    int32 (N,)                 task id (constant per episode)
  episodes.bin int64 (E+1,)              episode e is rows [episodes[e], episodes[e+1])
This is the official storage convention (reference doc §3.1). Sampling reads only the rows of the
sampled slices, so memory does not grow with the dataset.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np

FORMAT = "tdmpc_jax-dataset"
VERSION = 1
_FIELDS = {"obs": np.float32, "action": np.float32, "reward": np.float32, "task": np.int32}
VALUE_LIMIT = 1e6  # |obs|, |action|, |reward| above this is corrupt data (e.g. 3e38), not a state


class DatasetError(ValueError):
    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


class DatasetWriter:
    """Append whole episodes; `close()` validates and renames the temp dir into place (atomic)."""

    def __init__(self, path, obs_dim: int, action_dim: int, tasks: Sequence[str], task_set: Optional[str] = None,
                 overwrite: bool = False):
        from tdmpc_jax.results_io import check_output
        self.path = check_output(path, "dataset", overwrite)  # only an empty dir or a dataset is replaced
        self.overwrite = overwrite
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(self.path) + "-", dir=parent)
        self._files = {k: open(os.path.join(self._tmp, f"{k}.bin"), "wb") for k in _FIELDS}
        self.obs_dim, self.action_dim, self.tasks, self.task_set = obs_dim, action_dim, list(tasks), task_set
        self._starts = [0]

    def add_episode(self, obs, action, reward, task: int):
        """obs (T+1, <=O), action (T+1, <=A) and reward (T+1,) with entry 0 filler; task id."""
        obs, action, reward = (np.asarray(x, np.float32) for x in (obs, action, reward))
        n = obs.shape[0]
        if action.shape[0] != n or reward.shape != (n,) or n < 2:
            raise ValueError(f"episode arrays disagree: obs {obs.shape}, action {action.shape}, reward {reward.shape}")
        if not 0 <= task < len(self.tasks):
            raise ValueError(f"task id {task} outside [0, {len(self.tasks)})")
        if not (np.all(np.isfinite(reward[1:])) and np.all(np.isfinite(obs)) and np.all(np.isfinite(action[1:]))):
            raise ValueError("episode contains NaN/Inf outside the filler entry")
        if max(np.abs(obs).max(), np.abs(action[1:]).max(), np.abs(reward[1:]).max()) > VALUE_LIMIT:
            raise ValueError(f"episode contains values beyond +-{VALUE_LIMIT:g}")
        pad = lambda x, d: np.pad(x, ((0, 0), (0, d - x.shape[1])))
        self._files["obs"].write(pad(obs, self.obs_dim).tobytes())
        self._files["action"].write(pad(np.nan_to_num(action), self.action_dim).tobytes())
        self._files["reward"].write(reward.tobytes())
        self._files["task"].write(np.full(n, task, np.int32).tobytes())
        self._starts.append(self._starts[-1] + n)

    def close(self) -> "Dataset":
        for f in self._files.values():
            f.close()
        np.asarray(self._starts, np.int64).tofile(os.path.join(self._tmp, "episodes.bin"))
        meta = {"format": FORMAT, "version": VERSION, "num_steps": self._starts[-1],
                "num_episodes": len(self._starts) - 1, "obs_dim": self.obs_dim, "action_dim": self.action_dim,
                "tasks": self.tasks, "task_set": self.task_set}
        try:
            with open(os.path.join(self._tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            from tdmpc_jax import atomic
            from tdmpc_jax.results_io import check_output
            check_output(self.path, "dataset", self.overwrite)  # again: something may have appeared meanwhile
            if os.path.isfile(self.path) or os.path.islink(self.path):  # only reachable with overwrite
                os.remove(self.path)
            atomic.replace_dir(self.path, lambda built: os.rename(self._tmp, built))  # old one replaced whole
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        return Dataset(self.path)

    def abort(self):
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Dataset:
    """A read-only, memory-mapped dataset; `sample` returns official-convention slices."""

    def __init__(self, path, check_values: bool = True):
        self.path = os.fspath(path)
        try:
            with open(os.path.join(self.path, "meta.json")) as f:
                self.meta = json.load(f)
        except FileNotFoundError:
            raise DatasetError(self.path, "not a dataset (no meta.json)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(self.path, f"corrupt meta.json ({e})") from None
        self._check_meta()
        n, e = self.meta["num_steps"], self.meta["num_episodes"]
        self.obs_dim, self.action_dim = self.meta["obs_dim"], self.meta["action_dim"]
        self.tasks = list(self.meta["tasks"])
        shapes = {"obs": (n, self.obs_dim), "action": (n, self.action_dim), "reward": (n,), "task": (n,)}
        self.arrays = {k: self._map(k, _FIELDS[k], shapes[k]) for k in _FIELDS}
        self.episodes = np.asarray(self._map("episodes", np.int64, (e + 1,)))
        self.num_steps, self.num_episodes = n, e
        self._validate(check_values)

    def _check_meta(self):
        """Every key present with the right type and range, before any array is mapped."""
        m = self.meta
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DatasetError(self.path, "not a tdmpc_jax dataset (meta.json format)")
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        v = m.get("version")
        if not is_int(v):
            raise DatasetError(self.path, f"meta.json: 'version' missing or not an integer ({v!r})")
        if v != VERSION:
            raise DatasetError(self.path, f"meta.json: unsupported dataset version {v} (this tdmpc_jax reads "
                                          f"version {VERSION})")
        for k, lo in (("num_steps", 0), ("num_episodes", 1), ("obs_dim", 1), ("action_dim", 1)):
            if k not in m:
                raise DatasetError(self.path, f"meta.json: missing {k!r}")
            if not is_int(m[k]) or m[k] < lo:
                raise DatasetError(self.path, f"meta.json: {k!r} must be an integer >= {lo}, got {m[k]!r}")
        t = m.get("tasks")
        if not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t):
            raise DatasetError(self.path, f"meta.json: 'tasks' must be a non-empty list of task names, got {t!r}")
        if len(set(t)) != len(t):
            raise DatasetError(self.path, "meta.json: 'tasks' lists a task twice")
        ts = m.get("task_set")
        if ts is not None:
            from tdmpc_jax.config import TASK_SETS
            if ts not in TASK_SETS:
                raise DatasetError(self.path, f"meta.json: unknown 'task_set' {ts!r}")
            if list(TASK_SETS[ts].tasks[:len(t)]) != t:
                raise DatasetError(self.path, f"meta.json: 'tasks' is not the {ts} task list")

    def _map(self, name, dtype, shape):
        fn = os.path.join(self.path, f"{name}.bin")
        want = int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            size = os.path.getsize(fn)
        except OSError:
            raise DatasetError(self.path, f"missing {name}.bin") from None
        if size != want:
            raise DatasetError(self.path, f"{name}.bin holds {size} bytes, expected {want} for shape {shape}")
        if want == 0:
            return np.zeros(shape, dtype)
        return np.memmap(fn, dtype=dtype, mode="r", shape=shape)

    def _validate(self, check_values: bool):
        ep = self.episodes
        if ep[0] != 0 or ep[-1] != self.num_steps or np.any(np.diff(ep) < 2):
            raise DatasetError(self.path, "episode boundaries are not increasing offsets covering the data")
        if not check_values:
            return
        starts = np.zeros(self.num_steps, bool)
        starts[ep[:-1]] = True
        lim = VALUE_LIMIT
        width = max(self.obs_dim, self.action_dim, 1)
        chunk = max(1 << 12, (1 << 24) // width)  # rows per pass: ~64 MB of obs
        for i in range(0, self.num_steps, chunk):
            st = starts[i:i + chunk]
            r = np.asarray(self.arrays["reward"][i:i + chunk])
            bad = ~(np.abs(r) <= lim) & ~st
            if bad.any():
                k = int(np.argmax(bad))
                what = "NaN/Inf reward" if not np.isfinite(r[k]) else f"reward {float(r[k]):g} (beyond +-{lim:g})"
                raise DatasetError(self.path, f"{what} at step {i + k} (not a filler entry)")
            t = np.asarray(self.arrays["task"][i:i + chunk])
            if t.min() < 0 or t.max() >= len(self.tasks):
                raise DatasetError(self.path, f"task ids outside [0, {len(self.tasks)})")
            prev = np.asarray(self.arrays["task"][i - 1:i]) if i else t[:1]
            changed = (t != np.concatenate([prev, t[:-1]])) & ~st
            if changed.any():
                raise DatasetError(self.path, f"task id changes inside an episode at step {i + int(np.argmax(changed))}")
            for name, rows_ok in (("obs", None), ("action", ~st)):
                x = np.asarray(self.arrays[name][i:i + chunk])
                if rows_ok is not None:
                    x = x[rows_ok]  # an episode's first action is filler
                if x.size and not (x.min() >= -lim and x.max() <= lim):  # NaN fails both comparisons
                    row = np.nonzero(~np.all(np.abs(x) <= lim, axis=1))[0][0]
                    step = i + (int(row) if rows_ok is None else int(np.nonzero(rows_ok)[0][row]))
                    raise DatasetError(self.path, f"{name} at step {step} holds NaN, Inf or values beyond +-{lim:g}")

    def check_compatible(self, cfg, who="model"):
        """Raise unless the dataset's dims and task list fit a ModelConfig."""
        if (self.obs_dim, self.action_dim) != (cfg.obs_dim, cfg.action_dim):
            raise DatasetError(self.path, f"obs/action dims {(self.obs_dim, self.action_dim)} differ from the "
                                          f"{who}'s {(cfg.obs_dim, cfg.action_dim)}")
        if cfg.multitask and list(cfg.tasks[:len(self.tasks)]) != self.tasks:
            raise DatasetError(self.path, f"task list differs from the {who}'s task set")

    def sample(self, rng: np.random.Generator, batch_size: int, horizon: int):
        """Slices of horizon+1 steps: episode uniform, then start uniform (official SliceSampler)."""
        return sample_slices(self.arrays, self.episodes, rng, batch_size, horizon, self.path)


def merge_datasets(path, parts: Sequence["Dataset"], overwrite: bool = False) -> "Dataset":
    """One dataset holding every episode of `parts` in order (same dims and task list), written
    atomically like any other (`DatasetWriter`)."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for ds in parts[1:]:
        if (ds.obs_dim, ds.action_dim, ds.tasks) != (first.obs_dim, first.action_dim, first.tasks):
            raise DatasetError(ds.path, f"dims or tasks differ from {first.path}'s: cannot merge")
    with DatasetWriter(path, first.obs_dim, first.action_dim, first.tasks, first.meta.get("task_set"),
                       overwrite=overwrite) as w:
        for ds in parts:
            for e in range(ds.num_episodes):
                a, b = int(ds.episodes[e]), int(ds.episodes[e + 1])
                action = np.array(ds.arrays["action"][a:b])
                action[0] = np.nan  # entry 0 is the filler of every episode
                w.add_episode(np.asarray(ds.arrays["obs"][a:b]), action, np.asarray(ds.arrays["reward"][a:b]),
                              int(ds.arrays["task"][a]))
    return Dataset(path)


def sample_slices(arrays, episodes, rng: np.random.Generator, batch_size: int, horizon: int, name="buffer"):
    """(obs (H+1,B,O), action (H,B,A), reward (H,B), task (B,)) from row arrays and episode offsets."""
    lengths = np.diff(episodes)
    usable = np.nonzero(lengths >= horizon + 1)[0]
    if len(usable) == 0:
        raise DatasetError(name, f"no episode has {horizon + 1} steps")
    ep = usable[rng.integers(0, len(usable), batch_size)]
    start = episodes[ep] + rng.integers(0, lengths[ep] - horizon, batch_size)
    idx = start[:, None] + np.arange(horizon + 1)[None]  # (B, H+1)
    order = np.argsort(idx, axis=None)  # read rows in file order
    flat = idx.reshape(-1)[order]
    take = lambda a: _unsort(np.asarray(a[flat]), order).reshape(idx.shape + a.shape[1:])
    obs, action, reward = take(arrays["obs"]), take(arrays["action"]), take(arrays["reward"])
    task = np.asarray(arrays["task"][start])
    return (np.swapaxes(obs, 0, 1), np.swapaxes(action[:, 1:], 0, 1), np.swapaxes(reward[:, 1:], 0, 1),
            task.astype(np.int32))


def _unsort(values, order):
    out = np.empty_like(values)
    out[order] = values
    return out
