"""Bernoulli masks from jax.random's own Threefry-2x32 stream, unrolled so XLA:CPU fuses them.

`bernoulli(key, p, shape)` returns exactly `jax.random.bernoulli(key, p, shape)` (same key, same bits,
same comparison; tested bit for bit) for the default threefry keys with `jax_threefry_partitionable`
(JAX's default). The difference is only in how it is compiled: on CPU, JAX lowers the
20 Threefry rounds as a rolled `while` loop of 5 iterations whose state (two uint32 arrays of the
mask's size) is copied in and out of every iteration, so a mask costs ~10 passes over memory. Written
as plain unrolled uint32 arithmetic (the same rounds and key schedule as
jax/_src/random/threefry2x32.py), XLA fuses the hash, the float conversion and the comparison into
one elementwise loop that never materialises the random bits. Any other key type or setting falls
back to jax.random.bernoulli.
"""
from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), unrolled; all uint32, broadcasting."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotl(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _raw_threefry_key(key):
    """The uint32[2] data of a threefry key, or None when the key is another PRNG."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if "threefry" not in str(jax.random.key_impl(key)):
            return None
        key = jax.random.key_data(key)
    elif jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    if key.shape != (2,) or key.dtype != jnp.uint32:
        return None
    return key


def random_bits32(key, shape):
    """== jax.random.bits(key, shape, uint32) for a threefry key (partitionable mode)."""
    size = int(np.prod(shape))
    if size >= 2 ** 32:
        raise ValueError("more than 2**32 values from one key")
    counts = jax.lax.iota(jnp.uint32, size).reshape(shape)  # the flat index; its high word is 0
    b1, b2 = threefry2x32(key[0], key[1], jnp.zeros((), jnp.uint32), counts)
    return b1 ^ b2


def bernoulli(key, p: float, shape):
    """== jax.random.bernoulli(key, p, shape) for a Python float p (bit-identical; see module doc).

    jax draws u = m / 2^23 with m = bits >> 9 and keeps u < float32(p); as u is exact that is the
    integer test m < ceil(float32(p) * 2^23), i.e. bits < that threshold << 9.
    """
    raw = _raw_threefry_key(key)
    if raw is None or not jax.config.jax_threefry_partitionable or not 0.0 < p < 1.0:
        return jax.random.bernoulli(key, p, shape)
    p32 = fractions.Fraction(float(np.float32(p)))
    m = -((-p32 * 2 ** 23) // 1)  # ceil
    return random_bits32(raw, tuple(shape)) < np.uint32(int(m) << 9)
