"""Frozen configuration dataclasses and the official model-size table.

Everything here is plain data: no module reads global flags; one config object flows through. Tasks and
task sets (MT30/MT80 and any registered one: `TASK_SETS`, `get_task_set`, `TaskSet`) are defined in
`tdmpc_jax.task_registry` (which says how to add one) and re-exported here. Distillation terms are defined
in `tdmpc_jax.distill_terms` (which says how to add one); `TrainConfig` carries their coefficients (a field
per built-in term, `distill_extra` for the others; `tcfg.coef(field)` reads either).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from tdmpc_jax.task_registry import (DMC_EPISODE_LENGTH, MW_EPISODE_LENGTH, TASK_SETS,  # noqa: F401
                                     TaskSet, get_task_set)

# --- task sets: defined in tdmpc_jax.task_registry (official order: the task id is the index) ---------

MT30_TASKS: Tuple[str, ...] = TASK_SETS["mt30"].tasks
MT30_OBS_DIMS: Tuple[int, ...] = TASK_SETS["mt30"].obs_dims
MT30_ACTION_DIMS: Tuple[int, ...] = TASK_SETS["mt30"].action_dims
MT80_TASKS: Tuple[str, ...] = TASK_SETS["mt80"].tasks
MT80_OBS_DIMS: Tuple[int, ...] = TASK_SETS["mt80"].obs_dims
MT80_ACTION_DIMS: Tuple[int, ...] = TASK_SETS["mt80"].action_dims


# --- model sizes -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SizeSpec:
    enc_dim: int
    mlp_dim: int
    latent_dim: int
    num_enc_layers: int
    num_q: int


MODEL_SIZES = {
    1: SizeSpec(256, 384, 128, 2, 2),
    5: SizeSpec(256, 512, 512, 2, 5),
    19: SizeSpec(1024, 1024, 768, 3, 5),
    48: SizeSpec(1792, 1792, 768, 4, 5),
    317: SizeSpec(4096, 4096, 1376, 5, 8),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """World-model architecture. `tasks` empty means single-task (no task embedding)."""

    obs_dim: int
    action_dim: int
    latent_dim: int = 128
    enc_dim: int = 256
    mlp_dim: int = 384
    num_enc_layers: int = 2
    num_q: int = 2
    task_dim: int = 0
    num_bins: int = 101
    vmin: float = -10.0
    vmax: float = 10.0
    simnorm_dim: int = 8
    dropout: float = 0.01
    log_std_min: float = -10.0
    log_std_max: float = 2.0
    tasks: Tuple[str, ...] = ()
    action_dims: Tuple[int, ...] = ()
    obs_dims: Tuple[int, ...] = ()
    episode_lengths: Tuple[int, ...] = ()
    task_set: Optional[str] = None
    model_size: Optional[int] = None

    def __post_init__(self):
        if self.latent_dim % self.simnorm_dim:
            raise ValueError(f"latent_dim {self.latent_dim} is not divisible by simnorm_dim {self.simnorm_dim}")
        n = len(self.tasks)
        if self.multitask:
            if self.task_dim <= 0:
                raise ValueError("a multi-task model needs task_dim > 0")
            for name in ("action_dims", "obs_dims", "episode_lengths"):
                if len(getattr(self, name)) != n:
                    raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} tasks")
            if max(self.action_dims) > self.action_dim or max(self.obs_dims) > self.obs_dim:
                raise ValueError("per-task dims exceed the padded obs/action dims")

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 0

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def enc_hidden(self) -> Tuple[int, ...]:
        return (self.enc_dim,) * max(self.num_enc_layers - 1, 1)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not in this model's task set "
                             f"({self.task_set or len(self.tasks)} tasks)")
        return self.tasks.index(task)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


def official_task_dim(task_set: Optional[str], model_size: Optional[int]) -> int:
    """The official parse_cfg quirk: 96 for mt80 and for mt30 sizes 1 and 317, else 64; 0 single-task."""
    if task_set is None:
        return 0
    if task_set == "mt80" or model_size in (1, 317):
        return 96
    return 64


def make_model_config(size: int = 1, task_set: Optional[str] = "mt30", *,
                      obs_dim: Optional[int] = None, action_dim: Optional[int] = None,
                      **overrides) -> ModelConfig:
    """The official architecture for (size, task_set); single-task needs obs/action dims.

    `overrides` replace any field (pass model_size=None when the result is no official size)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size} (known: {sorted(MODEL_SIZES)})")
    spec = MODEL_SIZES[size]
    latent = spec.latent_dim
    if task_set == "mt30" and size == 19:
        latent = 512  # official quirk
    kw = dict(enc_dim=spec.enc_dim, mlp_dim=spec.mlp_dim, latent_dim=latent,
              num_enc_layers=spec.num_enc_layers, num_q=spec.num_q,
              task_dim=official_task_dim(task_set, size), model_size=size)
    if task_set is not None:
        ts = get_task_set(task_set)
        kw.update(tasks=ts.tasks, action_dims=ts.action_dims, obs_dims=ts.obs_dims,
                  episode_lengths=ts.episode_lengths, task_set=ts.name,
                  obs_dim=ts.obs_dim, action_dim=ts.action_dim)
    else:
        if obs_dim is None or action_dim is None:
            raise ValueError("a single-task config needs obs_dim and action_dim")
        kw.update(obs_dim=obs_dim, action_dim=action_dim)
    kw.update(overrides)
    return ModelConfig(**kw)


# Every distillation term is a `DistillTerm` of the registry `tdmpc_jax.distill_terms` (which says how to
# add one). `DISTILL_TERMS` (field -> (flag, help)) and `DISTILL_COEFS` (the fields) are views of it, read
# when accessed (module __getattr__: config imports the registry lazily, it imports networks -> config).
def _distill_terms():
    from tdmpc_jax import distill_terms
    return distill_terms


def __getattr__(name):
    if name == "DISTILL_TERMS":
        return {t.field: (t.flag, t.help) for t in _distill_terms().get_terms()}
    if name == "DISTILL_COEFS":
        return tuple(t.field for t in _distill_terms().get_terms())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Offline/online TD-MPC2 update hyper-parameters (official defaults) and distillation terms."""

    batch_size: int = 256
    horizon: int = 3
    lr: float = 3e-4
    enc_lr_scale: float = 0.3
    pi_adam_eps: float = 1e-5
    grad_clip_norm: float = 20.0
    tau: float = 0.01
    rho: float = 0.5
    consistency_coef: float = 20.0
    reward_coef: float = 0.1
    value_coef: float = 0.1
    entropy_coef: float = 1e-4
    scale_tau: float = 0.01
    policy_loss: str = "new"  # 'new' (tdmpc2 HEAD) or 'old' (2023 code, TD-MPC-Opt fork)
    # official 'new' code quirk: the policy loss's task-embedding gradient is added to the NEXT
    # step's world-model gradient (README: "Policy-loss leak"); False keeps the embedding out of it
    policy_emb_leak: bool = False
    # distillation (TD-MPC-Opt): coef x MSE(student reward, teacher reward) on t=0; extras optional
    distill_coef: float = 0.0
    distill_reward_kl_coef: float = 0.0
    distill_q_coef: float = 0.0
    distill_policy_coef: float = 0.0
    distill_value_coef: float = 0.0   # MSE(student Q, teacher Q) at the teacher's policy action
    distill_action_coef: float = 0.0  # MSE(student policy mean, dataset action): a teacher-collected dataset's
    distill_model_coef: float = 0.0   # rewards, Q values and policy along the rollout (distill_terms.model_rollout)
    distill_temperature: float = 1.0
    # coefficients of registered terms without a field above: ((field, coef), ...) (tdmpc_jax.distill_terms)
    distill_extra: Tuple[Tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.policy_loss not in ("new", "old"):
            raise ValueError(f"policy_loss must be 'new' or 'old', got {self.policy_loss!r}")
        if self.policy_emb_leak and self.policy_loss != "new":
            raise ValueError("policy_emb_leak reproduces the 'new' policy loss only (the old code freezes the embedding)")
        if self.batch_size < 1 or self.horizon < 1:
            raise ValueError("batch_size and horizon must be >= 1")
        # lists (JSON metadata) -> the hashable tuple form
        extra = tuple((str(f), float(c)) for f, c in self.distill_extra)
        object.__setattr__(self, "distill_extra", extra)
        terms = _distill_terms()
        fields = {f.name for f in dataclasses.fields(self)}
        seen = set()
        for f, _ in extra:
            if terms.find_term(f) is None:
                raise ValueError(f"distill_extra: {f!r} is not a registered distillation term "
                                 "(tdmpc_jax.distill_terms.register_term)")
            if f in fields:
                raise ValueError(f"distill_extra: {f!r} is a TrainConfig field: set {f}= instead")
            if f in seen:
                raise ValueError(f"distill_extra: {f!r} is given twice")
            seen.add(f)
        for t in terms.get_terms():
            if self.coef(t.field) < 0:
                raise ValueError(f"{t.field} must be >= 0")

    def coef(self, field: str) -> float:
        """The coefficient of the distillation term `field` (its TrainConfig field, else `distill_extra`; 0
        for a registered term not given)."""
        if _distill_terms().find_term(field) is None:
            raise ValueError(f"unknown distillation term {field!r}")
        if field in self.__dataclass_fields__:
            return getattr(self, field)
        return dict(self.distill_extra).get(field, 0.0)

    @classmethod
    def distill_kwargs(cls, coefs: dict) -> dict:
        """{field: coef} of registered terms -> TrainConfig keyword arguments (the fields, and the other
        terms' positive coefficients as `distill_extra`)."""
        kw = {f: c for f, c in coefs.items() if f in cls.__dataclass_fields__}
        extra = tuple((f, c) for f, c in coefs.items() if f not in kw and c > 0)
        return dict(kw, distill_extra=extra) if extra else kw

    @property
    def uses_teacher(self) -> bool:
        return any(self.coef(t.field) > 0 for t in _distill_terms().get_terms())


def parse_size_spec(spec) -> "int | Tuple[int, int, int]":
    """'1'/'5'/'19'/'48'/'317' -> that official size; 'enc,mlp,latent' -> the three dims (ValueError otherwise)."""
    s = str(spec).strip()
    if "," not in s:
        if not s.isdigit() or int(s) not in MODEL_SIZES:
            raise ValueError(f"not an official size ({'/'.join(map(str, MODEL_SIZES))}) nor enc,mlp,latent dims")
        return int(s)
    parts = [p.strip() for p in s.split(",")]
    if len(parts) != 3:
        raise ValueError(f"give three dims enc,mlp,latent (got {len(parts)})")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError("enc,mlp,latent must be integers") from None
    if min(dims) < 1:
        raise ValueError("enc,mlp,latent must be positive")
    simnorm = ModelConfig.__dataclass_fields__["simnorm_dim"].default
    if dims[2] % simnorm:
        raise ValueError(f"latent dim {dims[2]} is not a multiple of {simnorm} (SimNorm groups)")
    return dims


def config_from_spec(spec: str, task_set: Optional[str], **kw) -> ModelConfig:
    """'1'/'5'/... -> the official size; 'enc,mlp,latent' -> that (non-official) architecture."""
    size = parse_size_spec(spec)
    if isinstance(size, tuple):
        enc, mlp, latent = size
        return make_model_config(1, task_set, enc_dim=enc, mlp_dim=mlp, latent_dim=latent, model_size=None, **kw)
    return make_model_config(size, task_set, **kw)


def student_config(spec: str, teacher: Optional[ModelConfig] = None, task_set: Optional[str] = None) -> ModelConfig:
    """The student architecture `spec` over its teacher's tasks (used by distill.py and the pipeline).

    An official task set (`task_set`, else the teacher's) gives `config_from_spec(spec, task_set)`. A teacher
    with a custom task list (e.g. checkpoints/teacher-mt4) gives its tasks, per-task dims and task_dim with the
    student's sizes: 'enc,mlp,latent' (the size-1 layout with these dims) or an official size's dims."""
    task_set = task_set or (teacher.task_set if teacher is not None else None)
    if task_set is not None:
        return config_from_spec(spec, task_set)
    if teacher is None or not teacher.multitask:
        raise ValueError("cannot tell the student's task set: give a multi-task teacher or an official task set")
    size = parse_size_spec(spec)
    layout = MODEL_SIZES[1 if isinstance(size, tuple) else size]
    enc, mlp, latent = size if isinstance(size, tuple) else (layout.enc_dim, layout.mlp_dim, layout.latent_dim)
    return dataclasses.replace(teacher, enc_dim=enc, mlp_dim=mlp, latent_dim=latent, num_enc_layers=layout.num_enc_layers,
                               num_q=layout.num_q, model_size=None)
