"""Scalar math of TD-MPC2: symlog/symexp, two-hot regression, soft cross-entropy, policy squashing.

All functions are pure jnp and broadcast over leading axes.
"""
from __future__ import annotations

import math as _m

import jax
import jax.numpy as jnp

LOG_SQRT_2PI = 0.5 * _m.log(2 * _m.pi)


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def bin_centres(num_bins: int, vmin: float, vmax: float):
    return jnp.linspace(vmin, vmax, num_bins, dtype=jnp.float32)


def two_hot(x, num_bins: int, vmin: float, vmax: float):
    """Scalar targets (...) -> two-hot distributions (..., num_bins) in the symlog domain."""
    if num_bins == 0:
        return x[..., None]
    if num_bins == 1:
        return symlog(x)[..., None]
    bin_size = (vmax - vmin) / (num_bins - 1)
    s = jnp.clip(symlog(x), vmin, vmax)
    pos = (s - vmin) / bin_size
    idx = jnp.floor(pos)
    off = pos - idx
    idx = idx.astype(jnp.int32)
    lo = jax.nn.one_hot(idx, num_bins, dtype=x.dtype) * (1.0 - off)[..., None]
    hi = jax.nn.one_hot((idx + 1) % num_bins, num_bins, dtype=x.dtype) * off[..., None]
    return lo + hi


def two_hot_inv(logits, vmin: float, vmax: float):
    """Logits (..., num_bins) -> decoded scalar (...): symexp of the expected bin centre."""
    num_bins = logits.shape[-1]
    if num_bins == 1:
        return symexp(logits[..., 0])
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return symexp(p @ bin_centres(num_bins, vmin, vmax))


def soft_ce(logits, target, num_bins: int, vmin: float, vmax: float):
    """Cross-entropy of logits (..., nb) against the two-hot encoding of scalar targets (...)."""
    return -jnp.sum(two_hot(target, num_bins, vmin, vmax) * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def squash_log_std(raw, log_std_min: float, log_std_max: float):
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (jnp.tanh(raw) + 1.0)


def gaussian_logprob(eps, log_std):
    """Official (new code) Gaussian log-prob, summed over the action axis incl. masked dims."""
    return jnp.sum(-0.5 * eps ** 2 - log_std - LOG_SQRT_2PI, axis=-1)


def squash_correction(action):
    """The tanh log-det term subtracted from a pre-squash log-prob (action already tanh'd)."""
    return jnp.sum(jnp.log(jax.nn.relu(1.0 - action ** 2) + 1e-6), axis=-1)
