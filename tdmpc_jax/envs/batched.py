"""`BatchedEnv`: many (task, episode) environments stepped in lock-step with padded arrays.

For the official evaluation protocol (one env per task built with `random=seed`, episodes in
sequence) `BatchedEnv.for_episodes` gives episode i of a task its own env whose random state has been
advanced by i resets — the same episode the official loop plays (these tasks draw no random numbers
between resets). Physics runs in-process (`num_workers=0`) or in worker processes that own disjoint
shards of the slots; `step_async` / `step_wait` return at once / block, so a caller can plan for one
part of the batch while another part steps (dm_control's per-step Python work holds the GIL, so
threads do not help; processes do).
"""
from __future__ import annotations

import multiprocessing as mp
from typing import List, Optional, Sequence, Tuple

import numpy as np

from tdmpc_jax.envs.dmc import DMCEnv, make
from tdmpc_jax.task_registry import find_task

Slot = Tuple[str, int, int]  # task, seed, episode index


def _build(slots: Sequence[Slot]) -> List[DMCEnv]:
    envs = []
    for task, seed, episode in slots:
        env = make(task, seed)
        for _ in range(episode):
            env.reset()
        envs.append(env)
    return envs


def task_dims(task: str) -> Tuple[int, int, int]:
    """(obs_dim, action_dim, episode_length): the registry's (nothing built), else a probe env's (an
    unregistered dm_control suite task)."""
    spec = find_task(task)
    env = spec if spec is not None else make(task, 0)
    return env.obs_dim, env.action_dim, env.episode_length


class _Shard:
    """Envs stepped in this process. Results are computed at `send` time."""

    def __init__(self, envs, obs_dim):
        self.envs, self.obs_dim = envs, obs_dim
        self.done = np.zeros(len(envs), bool)
        self.last = np.zeros((len(envs), obs_dim), np.float32)
        self._result = None

    def send_reset(self):
        self.done[:] = False
        for j, env in enumerate(self.envs):
            o = env.reset()
            self.last[j, :o.size] = o
            self.last[j, o.size:] = 0
        self._result = self.last.copy()

    def send_step(self, local_idx, actions):
        n = len(local_idx)
        obs = np.zeros((n, self.obs_dim), np.float32)
        rew = np.zeros(n, np.float32)
        done = np.ones(n, bool)
        for k, j in enumerate(local_idx):
            if self.done[j]:
                obs[k] = self.last[j]
                continue
            env = self.envs[j]
            o, r, d = env.step_unchecked(actions[k, : env.action_dim])
            obs[k, :o.size] = o
            self.last[j] = obs[k]
            rew[k], done[k] = r, d
            self.done[j] = d
        self._result = (obs, rew, done)

    def recv(self):
        res, self._result = self._result, None
        return res

    def close(self):
        pass


def _worker(conn, slots, obs_dim):
    shard = _Shard(_build(slots), obs_dim)
    conn.send("ready")
    while True:
        cmd, *args = conn.recv()
        if cmd == "close":
            conn.close()
            return
        try:
            shard.send_reset() if cmd == "reset" else shard.send_step(*args)
            conn.send(("ok", shard.recv()))
        except Exception as e:  # report to the parent, which raises
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _RemoteShard:
    """Envs stepped in a worker process; `send_*` returns at once, `recv` blocks."""

    def __init__(self, ctx, slots, obs_dim):
        """Starts the worker and returns at once; `wait_ready` blocks until its envs are built (so many
        workers start side by side: one after another, 14 workers took 64 s of a 115 s MT30 evaluation)."""
        self.conn, child = ctx.Pipe()
        self.size = len(slots)
        self.proc = ctx.Process(target=_worker, args=(child, list(slots), obs_dim), daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self):
        try:
            ok = self.conn.recv() == "ready"
        except EOFError:
            ok = False
        if not ok:
            raise RuntimeError("environment worker failed to start")

    def send_reset(self):
        self.conn.send(("reset",))

    def send_step(self, local_idx, actions):
        self.conn.send(("step", np.asarray(local_idx), actions))

    def recv(self):
        status, res = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"environment worker: {res}")
        return res

    def close(self):
        try:
            self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()


class BatchedEnv:
    """Lock-step batch of environments; padded obs (N, O) and actions (N, A)."""

    def __init__(self, envs: Sequence[DMCEnv] = (), obs_dim: Optional[int] = None,
                 action_dim: Optional[int] = None, *, _shards=None, _dims=None):
        if _shards is None:
            if not envs:
                raise ValueError("BatchedEnv needs at least one environment")
            obs_dims, action_dims = [e.obs_dim for e in envs], [e.action_dim for e in envs]
            lengths = [e.episode_length for e in envs]
        else:
            obs_dims, action_dims, lengths = _dims
        self.obs_dim = obs_dim or max(obs_dims)
        self.action_dim = action_dim or max(action_dims)
        if max(obs_dims) > self.obs_dim or max(action_dims) > self.action_dim:
            raise ValueError("an environment's dims exceed the batch's padded dims")
        self.action_dims = np.asarray(action_dims)
        self.episode_lengths = np.asarray(lengths)  # per env: its time limit in agent steps
        self.num = len(action_dims)
        self._shards = _shards if _shards is not None else [_Shard(list(envs), self.obs_dim)]
        sizes = [len(s.envs) if isinstance(s, _Shard) else s.size for s in self._shards]
        self._shard_of = np.repeat(np.arange(len(sizes)), sizes)
        self._local = np.concatenate([np.arange(n) for n in sizes])
        self._done = np.zeros(self.num, bool)
        self._pending = None

    @classmethod
    def for_episodes(cls, slots: Sequence[Slot], num_workers: int = 0, obs_dim=None, action_dim=None):
        """slots: (task, seed, episode_index). num_workers > 0 steps shards in worker processes."""
        if num_workers <= 0:
            return cls(_build(slots), obs_dim, action_dim)
        spec = {t: task_dims(t) for t in {s[0] for s in slots}}
        dims = tuple(list(d) for d in zip(*(spec[t] for t, _, _ in slots)))  # obs dims, action dims, lengths
        obs_dim = obs_dim or max(dims[0])
        ctx = mp.get_context("spawn")
        shards = [_RemoteShard(ctx, [slots[i] for i in part], obs_dim)
                  for part in np.array_split(np.arange(len(slots)), min(num_workers, len(slots)))]
        try:
            for sh in shards:
                sh.wait_ready()
        except BaseException:
            for sh in shards:
                sh.close()
            raise
        return cls(obs_dim=obs_dim, action_dim=action_dim, _shards=shards, _dims=dims)

    @property
    def envs(self) -> List[DMCEnv]:
        """The in-process environments (empty when they live in workers)."""
        return [e for s in self._shards if isinstance(s, _Shard) for e in s.envs]

    def close(self):
        for s in self._shards:
            s.close()
        self._shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reset(self) -> np.ndarray:
        for s in self._shards:
            s.send_reset()
        self._done[:] = False
        return np.concatenate([s.recv() for s in self._shards])

    def _check(self, actions, idx):
        a = np.asarray(actions, np.float32)
        if a.shape != (len(idx), self.action_dim):
            raise ValueError(f"actions must have shape ({len(idx)}, {self.action_dim}), got {a.shape}")
        if not np.all(np.isfinite(a)):
            bad = [int(idx[j]) for j in np.nonzero(~np.all(np.isfinite(a), axis=1))[0]]
            raise ValueError(f"actions for slots {bad} contain NaN or Inf")
        return a

    def step_async(self, actions, idx=None):
        """Start stepping slots `idx` (default all, ascending) with padded `actions` (len(idx), A)."""
        if self._pending is not None:
            raise RuntimeError("step_wait() must be called before the next step_async()")
        idx = np.arange(self.num) if idx is None else np.asarray(idx)
        a = self._check(actions, idx)
        used = []
        for k, shard in enumerate(self._shards):
            sel = np.nonzero(self._shard_of[idx] == k)[0]
            if len(sel):
                shard.send_step(self._local[idx[sel]], a[sel])
                used.append((shard, sel))
        self._pending = (idx, used)

    def step_wait(self):
        """-> obs (len(idx), O), rewards (len(idx),), dones (len(idx),) of the pending step."""
        if self._pending is None:
            raise RuntimeError("no step in flight")
        idx, used = self._pending
        self._pending = None
        obs = np.zeros((len(idx), self.obs_dim), np.float32)
        rew = np.zeros(len(idx), np.float32)
        done = np.zeros(len(idx), bool)
        for shard, sel in used:
            obs[sel], rew[sel], done[sel] = shard.recv()
        self._done[idx] = done
        return obs, rew, done

    def step(self, actions, idx=None):
        self.step_async(actions, idx)
        return self.step_wait()

    @property
    def done(self) -> np.ndarray:
        return self._done.copy()
