"""Multi-task view: obs zero-padded at the end to the set's max dim, actions truncated per task.

Task sets (the order is the task id) are registered in `tdmpc_jax.task_registry`, masks built by its
`action_masks`."""
from __future__ import annotations

import numpy as np

from tdmpc_jax import task_registry
from tdmpc_jax.task_registry import TaskSet, get_task_set


def pad_obs(obs: np.ndarray, dim: int) -> np.ndarray:
    obs = np.asarray(obs, np.float32)
    if obs.shape[-1] > dim:
        raise ValueError(f"observation dim {obs.shape[-1]} exceeds the padded dim {dim}")
    pad = [(0, 0)] * (obs.ndim - 1) + [(0, dim - obs.shape[-1])]
    return np.pad(obs, pad)


def action_masks(task_set: TaskSet) -> np.ndarray:
    """(num_tasks, A) float32 0/1 (`task_registry.action_masks` of the set's action dims)."""
    return task_registry.action_masks(task_set.action_dims, task_set.action_dim)


class MultitaskEnv:
    """The official MultitaskWrapper: one env per task; reset(task_idx) selects it; padded I/O."""

    def __init__(self, task_set: str | TaskSet = "mt30", seed: int = 1, tasks=None):
        from tdmpc_jax.envs.dmc import make
        self.task_set = get_task_set(task_set) if isinstance(task_set, str) else task_set
        wanted = self.task_set.tasks if tasks is None else tuple(tasks)
        for t in wanted:
            self.task_set.index(t)
        self.envs = {self.task_set.index(t): make(t, seed) for t in wanted}
        for i, env in self.envs.items():
            if (env.obs_dim, env.action_dim) != (self.task_set.obs_dims[i], self.task_set.action_dims[i]):
                raise ValueError(f"{env.task}: env dims {(env.obs_dim, env.action_dim)} differ from the task "
                                 f"set's {(self.task_set.obs_dims[i], self.task_set.action_dims[i])}")
        self.obs_dim, self.action_dim = self.task_set.obs_dim, self.task_set.action_dim
        self.action_masks = action_masks(self.task_set)
        self._task = None

    def reset(self, task_idx: int) -> np.ndarray:
        if task_idx not in self.envs:
            raise ValueError(f"task id {task_idx} is not loaded")
        self._task = task_idx
        return pad_obs(self.envs[task_idx].reset(), self.obs_dim)

    def step(self, action):
        env = self.envs[self._task]
        a = np.asarray(action, np.float32)
        if a.shape != (self.action_dim,):
            raise ValueError(f"padded action must have shape ({self.action_dim},), got {a.shape}")
        obs, r, done, info = env.step(a[: env.action_dim])
        return pad_obs(obs, self.obs_dim), r, done, info
