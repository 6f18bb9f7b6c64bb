import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import scalar_math as tmath

NB, LO, HI = 101, -10.0, 10.0


def test_symlog_symexp_inverse():
    x = jnp.array([-1e3, -2.5, -1e-3, 0.0, 1e-3, 3.0, 250.0])
    np.testing.assert_allclose(tmath.symexp(tmath.symlog(x)), x, rtol=1e-5)
    np.testing.assert_allclose(tmath.symlog(jnp.array(np.e - 1)), 1.0, rtol=1e-6)


def test_two_hot_weights_and_edges():
    # symlog(x) = 0.3 lies between bins 51 (0.2) and 52 (0.4) with equal weight
    x = tmath.symexp(jnp.array([0.3]))
    th = np.asarray(tmath.two_hot(x, NB, LO, HI))[0]
    np.testing.assert_allclose(th[51], 0.5, atol=1e-5)
    np.testing.assert_allclose(th[52], 0.5, atol=1e-5)
    assert np.isclose(th.sum(), 1.0)
    # exactly vmax: idx 100, offset 0; the wrap to bin 0 carries weight 0
    top = np.asarray(tmath.two_hot(tmath.symexp(jnp.array([HI])), NB, LO, HI))[0]
    assert np.isclose(top[100], 1.0, atol=1e-4) and abs(top[0]) < 1e-4
    # beyond the range clamps
    big = np.asarray(tmath.two_hot(jnp.array([1e9]), NB, LO, HI))[0]
    assert np.isclose(big[100], 1.0)


def test_two_hot_inv_recovers_scalar():
    x = jnp.array([-50.0, -1.0, 0.0, 0.7, 12.0, 300.0])
    logits = jnp.log(tmath.two_hot(x, NB, LO, HI) + 1e-30)
    np.testing.assert_allclose(tmath.two_hot_inv(logits, LO, HI), x, rtol=1e-3, atol=1e-4)
    assert abs(float(tmath.two_hot_inv(jnp.zeros((NB,)), LO, HI))) < 1e-6


def test_soft_ce_matches_numpy():
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (5, NB))
    target = jnp.array([-3.0, 0.0, 0.5, 7.0, 100.0])
    got = tmath.soft_ce(logits, target, NB, LO, HI)
    lg = np.asarray(logits, np.float64)
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    want = -(np.asarray(tmath.two_hot(target, NB, LO, HI)) * logp).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_log_std_squash_range_and_logprob():
    raw = jnp.array([-100.0, 0.0, 100.0])
    np.testing.assert_allclose(tmath.squash_log_std(raw, -10.0, 2.0), [-10.0, -4.0, 2.0], atol=1e-5)
    eps = jnp.array([[0.5, -1.0]])
    log_std = jnp.array([[0.1, -0.2]])
    want = sum(-0.5 * e * e - s - 0.5 * np.log(2 * np.pi) for e, s in zip([0.5, -1.0], [0.1, -0.2]))
    np.testing.assert_allclose(tmath.gaussian_logprob(eps, log_std), [want], rtol=1e-6)


def test_this_compile_bound_file_compiles_without_most_optimizations():
    """conftest.COMPILE_BOUND is in effect for the files it names (repo_test checks it ends with them)."""
    import conftest
    assert "scalar_math_test.py" in conftest.COMPILE_BOUND
    assert jax.config.read("jax_disable_most_optimizations") is True
