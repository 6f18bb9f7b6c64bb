"""In-memory replay buffer of whole episodes (online training), sampled like the on-disk datasets."""
from __future__ import annotations

import numpy as np

from tdmpc_jax.data.dataset import sample_slices


class ReplayBuffer:
    """Episodes appended whole (entry 0 filler, official convention); oldest dropped past capacity."""

    def __init__(self, obs_dim: int, action_dim: int, capacity: int = 1_000_000):
        self.obs_dim, self.action_dim, self.capacity = obs_dim, action_dim, capacity
        self._eps = []  # list of dicts of arrays

    def add_episode(self, obs, action, reward, task: int):
        n = len(obs)
        self._eps.append({"obs": np.asarray(obs, np.float32), "action": np.nan_to_num(np.asarray(action, np.float32)),
                          "reward": np.asarray(reward, np.float32), "task": np.full(n, task, np.int32)})
        while sum(len(e["obs"]) for e in self._eps) > self.capacity and len(self._eps) > 1:
            self._eps.pop(0)
        self._cache = None

    @property
    def num_episodes(self) -> int:
        return len(self._eps)

    @property
    def num_steps(self) -> int:
        return sum(len(e["obs"]) for e in self._eps)

    def _arrays(self):
        if getattr(self, "_cache", None) is None:
            arrays = {k: np.concatenate([e[k] for e in self._eps]) for k in ("obs", "action", "reward", "task")}
            offsets = np.concatenate([[0], np.cumsum([len(e["obs"]) for e in self._eps])]).astype(np.int64)
            self._cache = (arrays, offsets)
        return self._cache

    def sample(self, rng: np.random.Generator, batch_size: int, horizon: int):
        arrays, offsets = self._arrays()
        return sample_slices(arrays, offsets, rng, batch_size, horizon)

    def state_dict(self) -> dict:
        arrays, offsets = self._arrays() if self._eps else ({}, np.zeros(1, np.int64))
        return dict(arrays, offsets=offsets)

    def load_state_dict(self, d):
        self._eps = []
        off = d["offsets"]
        for i in range(len(off) - 1):
            a, b = off[i], off[i + 1]
            self._eps.append({k: np.asarray(d[k][a:b]) for k in ("obs", "action", "reward", "task")})
        self._cache = None
