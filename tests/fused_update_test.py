"""The update's speed work keeps its math: each restructuring against the plain computation.

* `threefry.bernoulli` (the dropout masks) is jax.random.bernoulli bit for bit;
* `networks.fold_task_batch` (task embedding as per-sample first-layer biases) equals concatenating
  the embedding, in value and in gradient;
* the fused update (`make_update(fused=True)`, the default) follows the plain one (fused=False:
  concatenated embeddings, full first-layer gradients) step after step, with dropout, the
  policy-embedding leak and every distillation term;
* `make_train_steps` (K updates in one lax.scan) equals K single steps;
* the persistent compilation cache writes where it is told, and not at all with TDMPC_JAX_NO_CACHE=1.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmpc_jax import compile_cache, networks, threefry, train
from tdmpc_jax.config import TrainConfig
from tdmpc_jax.losses import Batch

from losses_test import random_params, small_cfg

H, B = 3, 8


def _batch(cfg, seed):
    rng = np.random.RandomState(seed)
    return Batch(rng.randn(H + 1, B, cfg.obs_dim).astype(np.float32),
                 rng.uniform(-1, 1, (H, B, cfg.action_dim)).astype(np.float32),
                 rng.uniform(0, 2, (H, B)).astype(np.float32),
                 rng.randint(0, max(cfg.num_tasks, 1), B).astype(np.int32))


@pytest.mark.parametrize("shape", [(7,), (3, 5, 2), (2, 4, 64, 48)])
@pytest.mark.parametrize("p", [0.99, 0.5, 0.01])
def test_bernoulli_is_jax_random_bernoulli_bit_for_bit(shape, p):
    key = jax.random.PRNGKey(11)
    np.testing.assert_array_equal(jax.jit(lambda k: threefry.bernoulli(k, p, shape))(key),
                                  jax.random.bernoulli(key, p, shape))
    keys = jax.random.split(key, 5)  # the Q ensemble: one key per member, vmapped
    np.testing.assert_array_equal(jax.vmap(lambda k: threefry.bernoulli(k, p, shape))(keys),
                                  jax.vmap(lambda k: jax.random.bernoulli(k, p, shape))(keys))
    typed = jax.random.key(3)
    np.testing.assert_array_equal(threefry.bernoulli(typed, p, shape), jax.random.bernoulli(typed, p, shape))
    np.testing.assert_array_equal(threefry.random_bits32(key, shape), jax.random.bits(key, shape, jnp.uint32))


def test_bernoulli_rate_is_exact_on_many_draws():
    keep = np.asarray(threefry.bernoulli(jax.random.PRNGKey(0), 0.99, (4_000_000,)))
    assert abs(keep.mean() - 0.99) < 5 * np.sqrt(0.99 * 0.01 / keep.size)


def test_fold_task_batch_equals_concatenated_embedding():
    cfg = small_cfg(num_q=3)
    params, target = random_params(cfg, 1)
    batch = _batch(cfg, 0)
    z = jax.random.normal(jax.random.PRNGKey(2), (H, B, cfg.latent_dim))
    a, task = jnp.asarray(batch.action), jnp.asarray(batch.task)

    def heads(c, p, tq, emb):
        e = None if emb is None else jnp.broadcast_to(emb, (H,) + emb.shape)
        e_sg = None if e is None else jax.lax.stop_gradient(e)  # the target Qs see a frozen embedding
        mask = jnp.ones((H, B, cfg.action_dim))
        return (networks.encode(c, p, batch.obs[1:], e), networks.next_latent(c, p, z, a, e),
                networks.reward_logits(c, p, z, a, e), networks.pi_dist(c, p, z, e, mask)[0],
                networks.q_logits(c, p["qs"], z, a, e), networks.q_logits(c, tq, z, a, e_sg))

    def plain(params):
        return heads(cfg, params, target, networks.embed(cfg, params, task))

    def folded(params):
        c, p, tq = networks.fold_task_batch(cfg, params, task, target)
        assert not c.multitask
        return heads(c, p, tq, None)

    for x, y in zip(plain(params), folded(params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda p: sum(jnp.sum(jnp.sin(o)) for o in f(p))
    g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(folded))(params)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(g1["task_emb"]["embedding"])).sum() > 0


def _run(cfg, tcfg, params, target, n, teacher=None, **kw):
    state = train.init_train_state(cfg, tcfg, params=params, target_qs=target)
    update = jax.jit(train.make_update(cfg, tcfg, teacher[0] if teacher else None, **kw))
    out = []
    for k in range(n):
        state, m = update(state, _batch(cfg, k), jax.random.PRNGKey(k), teacher[1] if teacher else None)
        out.append((state, m))
    return out


@pytest.mark.parametrize("case", ["dropout", "leak", "teacher", "single_task"])
def test_fused_update_follows_the_plain_update(case):
    if case == "single_task":
        cfg = small_cfg(dropout=0.01, tasks=(), action_dims=(), obs_dims=(), episode_lengths=(), task_dim=0)
    else:
        cfg = small_cfg(dropout=0.01, num_q=3)
    kw = dict(batch_size=B, horizon=H)
    teacher = None
    if case == "leak":
        kw["policy_emb_leak"] = True
    if case == "teacher":
        tc = small_cfg(latent_dim=24, mlp_dim=40, task_dim=6)
        teacher = (tc, random_params(tc, 7)[0])
        kw.update(distill_coef=0.4, distill_q_coef=0.1, distill_policy_coef=0.2, distill_reward_kl_coef=0.3,
                  distill_value_coef=0.1, distill_action_coef=0.2,
                  distill_extra=(("distill_plan_coef", 0.3), ("distill_plan_rank_coef", 0.2)))
    tcfg = TrainConfig(**kw)
    params, target = random_params(cfg, 0)
    fused = _run(cfg, tcfg, params, target, 3, teacher)
    plain = _run(cfg, tcfg, params, target, 3, teacher, fused=False)
    for (sf, mf), (sp, mp) in zip(fused, plain):
        for k in mp:
            np.testing.assert_allclose(mf[k], mp[k], rtol=1e-4, atol=1e-6, err_msg=k)
        # Adam's first steps are lr * sign(g) where |g| is near zero: allow a few such flips
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(sf.params), jax.tree_util.tree_leaves(sp.params)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2 * tcfg.lr, err_msg=jax.tree_util.keystr(path))
        close = [np.mean(np.abs(np.asarray(x) - np.asarray(y)) <= 1e-6)
                 for x, y in zip(jax.tree_util.tree_leaves(sf.params), jax.tree_util.tree_leaves(sp.params))]
        assert min(close) > 0.95, close
        np.testing.assert_allclose(sf.scale, sp.scale, rtol=1e-5)
        np.testing.assert_allclose(sf.emb_leak, sp.emb_leak, rtol=1e-3, atol=1e-6)


def test_scanned_block_equals_single_steps():
    cfg, K = small_cfg(dropout=0.01), 3
    tcfg = TrainConfig(batch_size=B, horizon=H)
    params, target = jax.tree_util.tree_map(np.asarray, random_params(cfg, 0))  # the steps donate the state
    batches = [_batch(cfg, k) for k in range(K)]
    keys = jax.random.split(jax.random.PRNGKey(5), K)
    mesh = train.make_mesh(jax.devices()[:1])
    step = train.make_train_step(cfg, tcfg, mesh=mesh)
    s1 = train.init_train_state(cfg, tcfg, params=params, target_qs=target)
    singles = []
    for k in range(K):
        s1, m = step(s1, batches[k], keys[k])
        singles.append(m)
    steps = train.make_train_steps(cfg, tcfg, mesh=mesh, block=K)
    stacked = Batch(*(np.stack(x) for x in zip(*batches)))
    s2 = train.init_train_state(cfg, tcfg, params=params, target_qs=target)
    s2, ms = steps(s2, stacked, keys)
    assert int(s2.step) == K
    for x, y in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    for k in range(K):
        for name, v in singles[k].items():
            np.testing.assert_allclose(ms[name][k], v, rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="expected 3 stacked"):
        steps(s2, Batch(*(x[:2] for x in stacked)), keys[:2])


def test_scanned_block_on_two_devices_equals_one():
    assert len(jax.devices()) >= 2, "tests run with XLA_FLAGS=--xla_force_host_platform_device_count=2"
    cfg, K = small_cfg(dropout=0.01), 2
    tcfg = TrainConfig(batch_size=B, horizon=H)
    stacked = Batch(*(np.stack(x) for x in zip(*[_batch(cfg, k) for k in range(K)])))
    keys = jax.random.split(jax.random.PRNGKey(1), K)
    out = []
    for devs in (jax.devices()[:1], jax.devices()[:2]):
        state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
        out.append(train.make_train_steps(cfg, tcfg, mesh=train.make_mesh(devs), block=K)(state, stacked, keys)[0])
    for x, y in zip(jax.tree_util.tree_leaves(out[0].params), jax.tree_util.tree_leaves(out[1].params)):
        np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5)


_CACHE_PROBE = """
import os, sys, jax, jax.numpy as jnp
from tdmpc_jax import compile_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(compile_cache.enable())
jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((64, 64))).block_until_ready()
"""


@pytest.mark.parametrize("off", [False, True])
def test_compilation_cache(tmp_path, off):
    env = dict(os.environ, TDMPC_JAX_CACHE_DIR=str(tmp_path / "xla"), TDMPC_JAX_NO_CACHE="1" if off else "")
    r = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where = r.stdout.strip().splitlines()[-1]
    assert where == ("None" if off else str(tmp_path / "xla" / compile_cache.host_tag()))
    written = [f for _, _, fs in os.walk(tmp_path / "xla") for f in fs]
    assert bool(written) != off, written


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("TDMPC_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert compile_cache.cache_dir() == "/x/cache/tdmpc_jax/xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "tdmpc_jax", "xla")
