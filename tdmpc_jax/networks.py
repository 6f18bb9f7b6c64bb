"""Flax modules of the TD-MPC2 world model and the pure functions over its params pytree.

Param tree (Flax names, kernels are (in, out)):
  task_emb/embedding (num_tasks, T); encoder, dynamics, reward, pi: layer_<i>/{dense, ln};
  qs: the same with a leading ensemble axis (num_q, ...). Target Qs live outside, same layout as qs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmpc_jax import math as tmath
from tdmpc_jax.config import ModelConfig

_trunc02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def _uniform_sym(a):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -a, a)
    return init


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def simnorm(x, group: int = 8):
    shape = x.shape
    x = x.reshape(shape[:-1] + (shape[-1] // group, group))
    return jax.nn.softmax(x, axis=-1).reshape(shape)


class NormedLinear(nn.Module):
    """Dense -> [Dropout] -> LayerNorm -> activation ('mish' or 'simnorm')."""

    features: int
    act: str = "mish"
    dropout: float = 0.0
    simnorm_dim: int = 8

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Dense(self.features, kernel_init=_trunc02, name="dense")(x)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln")(x)
        if self.act == "simnorm":
            return simnorm(x, self.simnorm_dim)
        return mish(x)


class MLP(nn.Module):
    """Official `mlp`: NormedLinear hidden layers (dropout on the first only), then the out layer.

    `out_act` None gives a plain Dense out layer (optionally zero-initialised, as the reward and Q heads).
    """

    hidden: Tuple[int, ...]
    out: int
    out_act: Optional[str] = None
    dropout: float = 0.0
    simnorm_dim: int = 8
    zero_out: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i, h in enumerate(self.hidden):
            x = NormedLinear(h, dropout=self.dropout if i == 0 else 0.0,
                             name=f"layer_{i}")(x, deterministic)
        last = f"layer_{len(self.hidden)}"
        if self.out_act is not None:
            return NormedLinear(self.out, act=self.out_act, simnorm_dim=self.simnorm_dim, name=last)(x)
        init = nn.initializers.zeros if self.zero_out else _trunc02
        return nn.Dense(self.out, kernel_init=init, name=last)(x)


class QEnsemble(nn.Module):
    """num_q MLP critics with stacked params (leading axis), each with its own dropout mask."""

    num_q: int
    hidden: Tuple[int, ...]
    out: int
    dropout: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        ens = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(None, None), out_axes=0, axis_size=self.num_q)
        return ens(self.hidden, self.out, None, self.dropout, zero_out=True, name="ensemble")(x, deterministic)


class WorldModel(nn.Module):
    """TD-MPC2 world model. Methods take a task embedding `emb` (B, T) or None (single-task)."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        if c.multitask:
            self.task_emb = nn.Embed(c.num_tasks, c.task_dim,
                                     embedding_init=_uniform_sym(0.02), name="task_emb")
        hid = (c.mlp_dim, c.mlp_dim)
        self.encoder = MLP(c.enc_hidden, c.latent_dim, out_act="simnorm", simnorm_dim=c.simnorm_dim)
        self.dynamics = MLP(hid, c.latent_dim, out_act="simnorm", simnorm_dim=c.simnorm_dim)
        self.reward_head = MLP(hid, c.num_bins, zero_out=True)
        self.pi_head = MLP(hid, 2 * c.action_dim)
        self.qs = QEnsemble(c.num_q, hid, c.num_bins, c.dropout)

    def embed(self, task):
        """Task ids (B,) -> embeddings (B, T), with the official max-norm 1 renormalisation."""
        if not self.cfg.multitask:
            return None
        return renorm_max_norm(self.task_emb(task))

    def encode(self, obs, emb):
        return self.encoder(_cat(obs, emb))

    def next(self, z, a, emb):
        return self.dynamics(_cat(z, emb, a))

    def reward_logits(self, z, a, emb):
        return self.reward_head(_cat(z, emb, a))

    def pi_raw(self, z, emb):
        out = self.pi_head(_cat(z, emb))
        return jnp.split(out, 2, axis=-1)

    def q_logits(self, z, a, emb, deterministic: bool = True):
        return self.qs(_cat(z, emb, a), deterministic)

    def __call__(self, obs, a, task):
        emb = self.embed(task)
        z = self.encode(obs, emb)
        return (self.next(z, a, emb), self.reward_logits(z, a, emb), self.pi_raw(z, emb),
                self.q_logits(z, a, emb))


def _cat(x, *rest):
    parts = [x] + [r for r in rest if r is not None]
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else x


def renorm_max_norm(rows, max_norm: float = 1.0):
    """PyTorch Embedding(max_norm): rows with norm > max_norm scaled by max_norm/(norm+1e-7)."""
    norm = jnp.linalg.norm(rows, axis=-1, keepdims=True)
    scale = jnp.where(norm > max_norm, max_norm / (norm + 1e-7), 1.0)
    return rows * jax.lax.stop_gradient(scale)


def init_params(cfg: ModelConfig, key):
    """Official initialisation: returns (params, target_qs) with target_qs an exact copy of qs."""
    model = WorldModel(cfg)
    obs = jnp.zeros((1, cfg.obs_dim), jnp.float32)
    a = jnp.zeros((1, cfg.action_dim), jnp.float32)
    task = jnp.zeros((1,), jnp.int32)
    params = model.init({"params": key}, obs, a, task)["params"]
    params = jax.tree_util.tree_map(jnp.asarray, nn.meta.unbox(params))
    return params, jax.tree_util.tree_map(jnp.copy, params["qs"])


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def action_masks(cfg: ModelConfig):
    """(num_tasks, A) float 0/1 matrix, ones in each task's first action_dims columns."""
    if not cfg.multitask:
        return jnp.ones((1, cfg.action_dim), jnp.float32)
    dims = jnp.asarray(cfg.action_dims)[:, None]
    return (jnp.arange(cfg.action_dim)[None, :] < dims).astype(jnp.float32)


# --- pure functions over (params, cfg) -----------------------------------------------------------

def _apply(cfg, params, method, *args, **kw):
    return WorldModel(cfg).apply({"params": params}, *args, method=method, **kw)


def embed(cfg, params, task):
    return _apply(cfg, params, WorldModel.embed, task) if cfg.multitask else None


def encode(cfg, params, obs, emb):
    return _apply(cfg, params, WorldModel.encode, obs, emb)


def next_latent(cfg, params, z, a, emb):
    return _apply(cfg, params, WorldModel.next, z, a, emb)


def reward_logits(cfg, params, z, a, emb):
    return _apply(cfg, params, WorldModel.reward_logits, z, a, emb)


def reward(cfg, params, z, a, emb):
    return tmath.two_hot_inv(reward_logits(cfg, params, z, a, emb), cfg.vmin, cfg.vmax)


def pi_dist(cfg, params, z, emb, mask):
    """Masked pre-squash mean and squashed log_std of the policy prior, each (B, A)."""
    mean, raw_log_std = _apply(cfg, params, WorldModel.pi_raw, z, emb)
    log_std = tmath.squash_log_std(raw_log_std, cfg.log_std_min, cfg.log_std_max)
    return mean * mask, log_std * mask


def pi_sample(cfg, params, z, emb, mask, key):
    """Sampled action (tanh-squashed), pre-squash log-prob and the squashed mean."""
    mean, log_std = pi_dist(cfg, params, z, emb, mask)
    eps = jax.random.normal(key, mean.shape, mean.dtype) * mask
    logp = tmath.gaussian_logprob(eps, log_std)
    action = jnp.tanh(mean + eps * jnp.exp(log_std))
    return action, logp, jnp.tanh(mean)


def q_logits(cfg, qs_params, z, a, emb, *, dropout_key=None):
    """Logits of every Q member (num_q, B, nb). `qs_params` is params['qs'] or the target Qs.

    A dropout_key turns training-mode dropout on (first layer, p=cfg.dropout).
    """
    x = _cat(z, emb, a)
    mod = QEnsemble(cfg.num_q, (cfg.mlp_dim, cfg.mlp_dim), cfg.num_bins, cfg.dropout)
    if dropout_key is None:
        return mod.apply({"params": qs_params}, x, True)
    return mod.apply({"params": qs_params}, x, False, rngs={"dropout": dropout_key})


def q_values(cfg, qs_params, z, a, emb, **kw):
    """Decoded scalar values of every member (num_q, B)."""
    return tmath.two_hot_inv(q_logits(cfg, qs_params, z, a, emb, **kw), cfg.vmin, cfg.vmax)
