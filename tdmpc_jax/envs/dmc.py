"""`make(task, seed)`: a DMControl task in the TD-MPC2 style (action repeat 2, 500 steps, flat obs).

Matches the official wrapper chain: `suite.load(domain, task, task_kwargs={'random': seed})`, the
action cast float32 -> float64, two control steps per agent step with summed reward, the observation
dict flattened in order as float32, and a 500-agent-step time limit (a registered task's own
`episode_length` otherwise).

What `make` builds comes from `tdmpc_jax.task_registry`: a registered task with a loader (the custom
MT30 tasks of `tdmpc_jax.envs.tasks`, or a user's) is built by it and its dims are checked against the
registered ones; any other 'domain-task' name is the stock dm_control suite task.
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "disable")

import numpy as np
from dm_control import suite

from tdmpc_jax import task_registry

DOMAIN_ALIASES = {"cup": "ball_in_cup", "pointmass": "point_mass"}
ACTION_REPEAT = 2
EPISODE_LENGTH = 500


def parse_task(name: str):
    """'cheetah-run-backwards' -> ('cheetah', 'run_backwards'); 'cup-spin' -> ('ball_in_cup', 'spin')."""
    if not isinstance(name, str) or "-" not in name:
        raise ValueError(f"unknown task {name!r}: expected 'domain-task', e.g. 'walker-walk'")
    domain, task = name.split("-", 1)
    return DOMAIN_ALIASES.get(domain, domain), task.replace("-", "_")


def _custom_tasks():
    """{(domain, task): TaskSpec} of the registered tasks with a loader (any spelling parse_task accepts)."""
    return {parse_task(t): s for t in task_registry.task_names()
            if (s := task_registry.get_task(t)).loader is not None}


def known_tasks():
    stock = [f"{d}-{t}".replace("_", "-").replace("ball-in-cup", "cup").replace("point-mass", "pointmass")
             for d, t in suite.ALL_TASKS]
    custom = [s.name for s in _custom_tasks().values()]
    return sorted(set(stock + custom))


def load_dm_env(name: str, seed: int):
    domain, task = parse_task(name)
    spec = _custom_tasks().get((domain, task))
    if spec is not None:
        return spec.factory()(random=seed)
    if (domain, task) not in suite.ALL_TASKS:
        raise ValueError(f"unknown task {name!r} (e.g. {', '.join(known_tasks()[:6])}, ...; "
                         f"{len(known_tasks())} known)")
    return suite.load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)


class DMCEnv:
    """One DMControl task with the TD-MPC2 interface: reset() -> obs; step(a) -> obs, r, done, info."""

    def __init__(self, task: str, seed: int = 1, episode_length: int | None = None,
                 action_repeat: int = ACTION_REPEAT):
        """episode_length None: the registered task's (`tdmpc_jax.task_registry`), else EPISODE_LENGTH."""
        self.task = task
        self.seed = seed
        self._env = load_dm_env(task, seed)
        spec = self._env.action_spec()
        if not (np.all(spec.minimum == -1) and np.all(spec.maximum == 1)):
            self._scale = (spec.maximum - spec.minimum) / 2.0
            self._offset = (spec.maximum + spec.minimum) / 2.0
        else:
            self._scale = self._offset = None
        self._action_dtype = spec.dtype
        self.action_dim = int(spec.shape[0])
        self.obs_dim = int(sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values()))
        spec = task_registry.find_task(task)
        if spec is not None and (spec.obs_dim, spec.action_dim) != (self.obs_dim, self.action_dim):
            raise ValueError(f"{task}: env obs/action dims {(self.obs_dim, self.action_dim)} differ from the "
                             f"registered {(spec.obs_dim, spec.action_dim)} (tdmpc_jax.task_registry)")
        if episode_length is None:
            episode_length = spec.episode_length if spec is not None else EPISODE_LENGTH
        self.episode_length = episode_length
        self.action_repeat = action_repeat
        self._t = None

    @property
    def physics(self):
        return self._env.physics

    @property
    def dm_env(self):
        return self._env

    @staticmethod
    def _flat(obs_dict):
        return np.concatenate([np.asarray(v).ravel() for v in obs_dict.values()]).astype(np.float32)

    def reset(self) -> np.ndarray:
        self._t = 0
        return self._flat(self._env.reset().observation)

    def check_action(self, action) -> np.ndarray:
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (self.action_dim,):
            raise ValueError(f"{self.task}: action must have shape ({self.action_dim},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{self.task}: action contains NaN or Inf: {a}")
        return a

    def step(self, action):
        if self._t is None:
            raise RuntimeError(f"{self.task}: call reset() before step()")
        if self._t >= self.episode_length:
            raise RuntimeError(f"{self.task}: episode is over (done after {self.episode_length} steps); call reset()")
        obs, reward, done = self.step_unchecked(self.check_action(action))
        return obs, reward, done, {"success": 0.0, "terminated": 0.0}

    def step_unchecked(self, action):
        """The step without validation (callers have checked shape and finiteness): obs, reward, done."""
        a = np.asarray(action, np.float32).astype(self._action_dtype)
        if self._scale is not None:
            a = self._scale * np.clip(a, -1, 1) + self._offset
        reward = 0.0
        for _ in range(self.action_repeat):
            ts = self._env.step(a)
            reward += ts.reward or 0.0
        self._t += 1
        return self._flat(ts.observation), float(reward), self._t >= self.episode_length

    def render(self, height=384, width=384, camera_id=None):
        if camera_id is None:
            camera_id = 2 if self.task.startswith("quadruped") else 0
        return self._env.physics.render(height, width, camera_id=camera_id)


def make(task: str, seed: int = 1, **kw) -> DMCEnv:
    """A TD-MPC2-style DMControl environment (custom MT30 tasks included)."""
    return DMCEnv(task, seed, **kw)
