"""The task registry: the one place where tasks, task sets and action masks are defined.

A task is a frozen `TaskSpec` (name, obs/action dims, episode length, loader); a task set is an ordered
tuple of registered tasks (the position is the task id: the official MT30/MT80 order below is
fidelity-critical). Everything else derives from here: `config.TASK_SETS` / `MT30_TASKS` / ... and the
per-task dims and episode lengths of `make_model_config`, `envs.make` (what to build, its time limit, a
dims check), `envs.MultitaskEnv`, `online.task_config`, the CLI's task names, and every action mask
(`action_masks`: the one function that builds them; `networks.action_masks` wraps it for the model).

Adding a task (no other file changes):
  1. its factory `(random=seed) -> dm_control control.Environment` (the package's own custom tasks live
     in `tdmpc_jax/envs/tasks/<domain>.py`; a user's may live anywhere); a stock dm_control suite task
     needs none;
  2. `register_task(TaskSpec("walker-crawl", obs_dim=24, action_dim=6, loader=crawl))`; inside the
     package, that call at the end of this module (loader "tdmpc_jax.envs.tasks.walker:crawl": imported
     when the task is first built, so this module never imports dm_control; the official sets' rows
     are the `_MT30` / `_MW_NAMES` tables).
Then `envs.make("walker-crawl")` builds it; `register_task_set("mine", ["walker-crawl", "walker-walk"])`
makes `make_model_config(1, "mine")`, `MultitaskEnv("mine")` and `check_tasks("mine")` work too.
`scoped()` restores the registry on exit (for tests, or a script trying tasks out).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

DMC_EPISODE_LENGTH = 500
MW_EPISODE_LENGTH = 100

Loader = Union[str, Callable[..., object], None]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task. loader: a factory `(random=seed) -> dm_control Environment`, its "module:function"
    path (imported lazily), or None for the stock dm_control suite task of that name ('domain-task')."""

    name: str
    obs_dim: int
    action_dim: int
    episode_length: int = DMC_EPISODE_LENGTH
    loader: Loader = None

    def __post_init__(self):
        if not isinstance(self.name, str) or "-" not in self.name or self.name != self.name.strip():
            raise ValueError(f"task name {self.name!r}: expected 'domain-task', e.g. 'walker-walk'")
        for f in ("obs_dim", "action_dim", "episode_length"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"task {self.name!r}: {f} must be a positive int, got {v!r}")
        if not (self.loader is None or callable(self.loader) or
                (isinstance(self.loader, str) and self.loader.count(":") == 1)):
            raise ValueError(f"task {self.name!r}: loader must be a callable, 'module:function' or None")

    def factory(self) -> Optional[Callable[..., object]]:
        """The loader as a callable (importing a "module:function" path), None for a stock suite task."""
        if isinstance(self.loader, str):
            module, fn = self.loader.split(":")
            return getattr(importlib.import_module(module), fn)
        return self.loader


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """An ordered task set with the per-task dims the multi-task model and planner need."""

    name: str
    tasks: Tuple[str, ...]
    obs_dims: Tuple[int, ...]
    action_dims: Tuple[int, ...]
    episode_lengths: Tuple[int, ...]

    @classmethod
    def of(cls, name: Optional[str], tasks: Sequence[str]) -> "TaskSet":
        """The task set of registered `tasks` in this order (not registered itself: see register_task_set)."""
        specs = [get_task(t) for t in tasks]
        if not specs:
            raise ValueError(f"task set {name!r} has no tasks")
        names = tuple(s.name for s in specs)
        dup = sorted({t for t in names if names.count(t) > 1})
        if dup:
            raise ValueError(f"task set {name!r} lists {dup[0]!r} twice")
        return cls(name, names, tuple(s.obs_dim for s in specs),
                   tuple(s.action_dim for s in specs), tuple(s.episode_length for s in specs))

    @property
    def obs_dim(self) -> int:
        return max(self.obs_dims)

    @property
    def action_dim(self) -> int:
        return max(self.action_dims)

    def index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r} for task set {self.name} "
                             f"(known: {', '.join(self.tasks)})")
        return self.tasks.index(task)


def action_masks(action_dims: Sequence[int], action_dim: Optional[int] = None) -> np.ndarray:
    """THE action masks: (len(action_dims), A) float32 0/1, row i ones in its first action_dims[i] columns.

    A is `action_dim` (default the largest dim). The only place masks are built: the model, planner and
    losses (`networks.action_masks`), `MultitaskEnv`, online seeding and exported graphs all use it."""
    dims = np.asarray(action_dims, np.int64)
    a = int(dims.max()) if action_dim is None and dims.size else action_dim
    if dims.ndim != 1 or dims.size == 0 or dims.min() < 1 or a is None or dims.max() > a:
        raise ValueError(f"action dims {tuple(action_dims)} do not fit {a} padded action dims")
    return (np.arange(a)[None, :] < dims[:, None]).astype(np.float32)


# --- the registry (module-level; `scoped` restores it) ------------------------------------------

_TASKS: Dict[str, TaskSpec] = {}
TASK_SETS: Dict[str, TaskSet] = {}  # config.TASK_SETS is this dict


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task; re-registering an equal spec is a no-op, a different one under its name an error."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task takes a TaskSpec, got {type(spec).__name__}")
    old = _TASKS.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"task {spec.name!r} is already registered as {old}")
    _TASKS[spec.name] = spec
    return spec


def register_task_set(name: str, tasks: Sequence[Union[str, TaskSpec]]) -> TaskSet:
    """Add the ordered task set `name` (TaskSpecs among `tasks` are registered first). -> the TaskSet."""
    if not isinstance(name, str) or not name or name in TASK_SETS:
        raise ValueError(f"task set name {name!r} is empty or already registered")
    names = [register_task(t).name if isinstance(t, TaskSpec) else t for t in tasks]
    TASK_SETS[name] = ts = TaskSet.of(name, names)
    return ts


def find_task(name) -> Optional[TaskSpec]:
    return _TASKS.get(name) if isinstance(name, str) else None


def get_task(name: str) -> TaskSpec:
    spec = find_task(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r} (not registered: see tdmpc_jax.task_registry)")
    return spec


def task_names() -> Tuple[str, ...]:
    """Every registered task, in registration order (the MT80 order first)."""
    return tuple(_TASKS)


def get_task_set(name: str) -> TaskSet:
    if name not in TASK_SETS:
        raise ValueError(f"unknown task set {name!r} (known: {', '.join(TASK_SETS)})")
    return TASK_SETS[name]


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Registrations made inside the block are undone on exit (the registry is restored in place)."""
    tasks, sets = dict(_TASKS), dict(TASK_SETS)
    try:
        yield
    finally:
        _TASKS.clear()
        _TASKS.update(tasks)
        TASK_SETS.clear()
        TASK_SETS.update(sets)


# --- the built-in tasks (official order: the task id is the index) -------------------------------

_CUSTOM = "tdmpc_jax.envs.tasks."
# name, obs_dim, action_dim, loader (None: the stock dm_control suite task)
_MT30 = (
    ("walker-stand", 24, 6, None),
    ("walker-walk", 24, 6, None),
    ("walker-run", 24, 6, None),
    ("cheetah-run", 17, 6, None),
    ("reacher-easy", 6, 2, None),
    ("reacher-hard", 6, 2, None),
    ("acrobot-swingup", 6, 1, None),
    ("pendulum-swingup", 3, 1, None),
    ("cartpole-balance", 5, 1, None),
    ("cartpole-balance-sparse", 5, 1, None),
    ("cartpole-swingup", 5, 1, None),
    ("cartpole-swingup-sparse", 5, 1, None),
    ("cup-catch", 8, 2, None),
    ("finger-spin", 9, 2, None),
    ("finger-turn-easy", 12, 2, None),
    ("finger-turn-hard", 12, 2, None),
    ("fish-swim", 24, 5, None),
    ("hopper-stand", 15, 4, None),
    ("hopper-hop", 15, 4, None),
    ("walker-walk-backwards", 24, 6, _CUSTOM + "walker:walk_backwards"),
    ("walker-run-backwards", 24, 6, _CUSTOM + "walker:run_backwards"),
    ("cheetah-run-backwards", 17, 6, _CUSTOM + "cheetah:run_backwards"),
    ("cheetah-run-front", 17, 6, _CUSTOM + "cheetah:run_front"),
    ("cheetah-run-back", 17, 6, _CUSTOM + "cheetah:run_back"),
    ("cheetah-jump", 17, 6, _CUSTOM + "cheetah:jump"),
    ("hopper-hop-backwards", 15, 4, _CUSTOM + "hopper:hop_backwards"),
    ("reacher-three-easy", 8, 3, _CUSTOM + "reacher:three_easy"),
    ("reacher-three-hard", 8, 3, _CUSTOM + "reacher:three_hard"),
    ("cup-spin", 8, 2, _CUSTOM + "ball_in_cup:spin"),
    ("pendulum-spin", 3, 1, _CUSTOM + "pendulum:spin"),
)
# Meta-World (MT80's last 50): dims and episode length only, no environment yet
_MW_NAMES = (
    "assembly", "basketball", "button-press-topdown", "button-press-topdown-wall", "button-press",
    "button-press-wall", "coffee-button", "coffee-pull", "coffee-push", "dial-turn", "disassemble",
    "door-open", "door-close", "drawer-close", "drawer-open", "faucet-open", "faucet-close", "hammer",
    "handle-press-side", "handle-press", "handle-pull-side", "handle-pull", "lever-pull",
    "peg-insert-side", "peg-unplug-side", "pick-out-of-hole", "pick-place", "pick-place-wall",
    "plate-slide", "plate-slide-side", "plate-slide-back", "plate-slide-back-side", "push-back", "push",
    "push-wall", "reach", "reach-wall", "shelf-place", "soccer", "stick-push", "stick-pull",
    "sweep-into", "sweep", "window-open", "window-close", "bin-picking", "box-close", "door-lock",
    "door-unlock", "hand-insert",
)
_MW = tuple(TaskSpec("mw-" + n, 39, 4, MW_EPISODE_LENGTH) for n in _MW_NAMES)

register_task_set("mt30", [TaskSpec(n, o, a, loader=f) for n, o, a, f in _MT30])
register_task_set("mt80", list(TASK_SETS["mt30"].tasks) + list(_MW))
