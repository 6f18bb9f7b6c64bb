"""`Agent`: a config plus params with batched, jitted world-model queries, and `load_checkpoint`."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import networks, quantize
from tdmpc_jax.checkpoints import official, orbax_io
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.checkpoints.torch_reader import read_torch_file
from tdmpc_jax.config import ModelConfig


@functools.partial(jax.jit, static_argnums=0)
def _encode(cfg, params, obs, task):
    return networks.encode(cfg, params, obs, networks.embed(cfg, params, task))


@functools.partial(jax.jit, static_argnums=0)
def _next(cfg, params, z, a, task):
    return networks.next_latent(cfg, params, z, a, networks.embed(cfg, params, task))


@functools.partial(jax.jit, static_argnums=0)
def _reward(cfg, params, z, a, task):
    return networks.reward(cfg, params, z, a, networks.embed(cfg, params, task))


@functools.partial(jax.jit, static_argnums=0)
def _pi(cfg, params, z, task):
    # single-task: the scalar 1.0 (an all-ones mask) keeps a bf16 compute's dtype
    mask = networks.task_action_mask(cfg, task) if cfg.multitask else 1.0
    mean, log_std = networks.pi_dist(cfg, params, z, networks.embed(cfg, params, task), mask)
    return jnp.tanh(mean), log_std


@functools.partial(jax.jit, static_argnums=0)
def _q(cfg, params, z, a, task):
    return networks.q_values(cfg, params["qs"], z, a, networks.embed(cfg, params, task))


@dataclasses.dataclass(frozen=True)
class Agent:
    """An immutable world model: `config`, `params`, `target_qs` (the Polyak copy) and `metadata`."""

    config: ModelConfig
    params: Dict[str, Any]
    target_qs: Dict[str, Any]
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def _task(self, task, batch):
        if isinstance(task, str):
            task = self.config.task_index(task)
        task = jnp.asarray(task, jnp.int32)
        if task.ndim == 0:
            task = jnp.full((batch,), task)
        if self.config.multitask and not (0 <= int(task.min()) and int(task.max()) < self.config.num_tasks):
            raise ValueError(f"task ids must lie in [0, {self.config.num_tasks})")
        return task

    def _check(self, name, x, dim):
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 2 or x.shape[-1] != dim:
            raise ValueError(f"{name} must have shape (B, {dim}), got {tuple(x.shape)}")
        return x

    def encode(self, obs, task=0):
        obs = self._check("obs", obs, self.config.obs_dim)
        return _encode(self.config, self.params, obs, self._task(task, obs.shape[0]))

    def next(self, z, action, task=0):
        z = self._check("z", z, self.config.latent_dim)
        a = self._check("action", action, self.config.action_dim)
        return _next(self.config, self.params, z, a, self._task(task, z.shape[0]))

    def reward(self, z, action, task=0):
        z = self._check("z", z, self.config.latent_dim)
        a = self._check("action", action, self.config.action_dim)
        return _reward(self.config, self.params, z, a, self._task(task, z.shape[0]))

    def pi(self, z, task=0):
        """Eval-mode policy prior: (tanh-squashed masked mean, masked log_std), each (B, A)."""
        z = self._check("z", z, self.config.latent_dim)
        return _pi(self.config, self.params, z, self._task(task, z.shape[0]))

    def q(self, z, action, task=0):
        """Decoded values of every Q member, (num_q, B), eval mode (no dropout)."""
        z = self._check("z", z, self.config.latent_dim)
        a = self._check("action", action, self.config.action_dim)
        return _q(self.config, self.params, z, a, self._task(task, z.shape[0]))

    def num_params(self) -> Dict[str, int]:
        groups = {k: networks.count_params(v) for k, v in self.params.items()}
        return {"learnable": sum(groups.values()), "target": networks.count_params(self.target_qs), **groups}

    def save(self, directory, fmt: str = "fp32", keep_fp16=(), **extra_metadata):
        """Orbax checkpoint in storage format `fmt` (a name in tdmpc_jax.quantize.FORMATS: fp32/fp16/bf16/int8/
        mixed or a registered one). `keep_fp16`: the sensitive kernels (see quantize.Format.uses_sensitivity)."""
        meta = {k: v for k, v in self.metadata.items() if _jsonable(v) and k != "param_format"}
        meta.update(quantize.get_format(fmt).metadata(keep_fp16))
        return orbax_io.save_orbax(directory, quantize.convert(self.params, fmt, keep_fp16),
                                   quantize.convert(self.target_qs, fmt, [p[1:] for p in keep_fp16 if p[0] == "qs"]),
                                   self.config, {**meta, **extra_metadata}, param_format=fmt)


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _jsonable(v):
    return isinstance(v, (str, int, float, bool, type(None), list, tuple))


def load_checkpoint(path, compute: str = "fp32", **overrides) -> Agent:
    """Load an official PyTorch `.pt` (old or new format, fp32/fp16/qint8) or a tdmpc_jax Orbax dir.

    compute: 'fp32' (dequantize once at load) or 'bf16' (bf16 kernels and matmuls).
    `overrides` (e.g. task_set='mt30', tasks=..., action_dims=...) replace inferred config fields.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    if os.path.isdir(path):
        params, target, cfg, meta = orbax_io.load_orbax(path)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        fmt = meta.get("param_format", "fp32")
        return Agent(cfg, _np(quantize.for_compute(params, compute, fmt)), _np(quantize.dequantize(target, fmt)),
                     dict(meta, source=path, compute=compute))
    obj = read_torch_file(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(path, "does not hold a state dict (expected {'model': state_dict} or a state dict)")
    shapes = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    try:
        cfg = official.infer_config(shapes, **overrides)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"cannot infer the architecture: {e}") from None
    params, target, info = official.state_dict_to_params(sd, cfg, path)
    if compute != "fp32":
        params = _np(quantize.for_compute(params, compute))
    return Agent(cfg, params, target, {"source": path, "source_format": info["format"], "compute": compute,
                                       "source_dtypes": info["dtypes"],
                                       "quantized_zero_fraction": info["quantized_zero_fraction"]})
