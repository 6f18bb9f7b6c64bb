"""MPPI planner: the lean computation equals the plain official one; masks, modes, batching."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmpc_jax import networks, planner
from tdmpc_jax.config import make_model_config


@pytest.fixture(scope="module")
def model(released_agent):
    return released_agent.config, jax.tree_util.tree_map(jnp.asarray, released_agent.params)


def test_condition_on_task_matches_concatenated_embedding(model):
    cfg, params = model
    obs = jax.random.normal(jax.random.PRNGKey(0), (6, 24))
    a = jax.random.uniform(jax.random.PRNGKey(1), (6, 6), minval=-1, maxval=1)
    for task in (0, 13, 29):
        emb = networks.embed(cfg, params, jnp.full((6,), task))
        c1, p1 = networks.condition_on_task(cfg, params, task)
        assert c1.task_dim == 0 and not c1.multitask
        z = networks.encode(cfg, params, obs, emb)
        np.testing.assert_allclose(networks.encode(c1, p1, obs, None), z, atol=2e-6)
        np.testing.assert_allclose(networks.next_latent(c1, p1, z, a, None), networks.next_latent(cfg, params, z, a, emb),
                                   atol=2e-6)
        np.testing.assert_allclose(networks.reward(c1, p1, z, a, None), networks.reward(cfg, params, z, a, emb),
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(networks.q_values(c1, p1["qs"], z, a, None),
                                   networks.q_values(cfg, params["qs"], z, a, emb), atol=2e-4, rtol=1e-5)


def test_lean_value_equals_plain_value(model):
    cfg, params = model
    task = 3
    mask = networks.action_masks(cfg)[task]
    obs = jax.random.normal(jax.random.PRNGKey(2), (1, 24))
    acts = jax.random.uniform(jax.random.PRNGKey(3), (3, 100, 6), minval=-1, maxval=1) * mask
    emb = networks.embed(cfg, params, jnp.full((100,), task))
    z0 = networks.encode(cfg, params, obs, emb[:1])
    plain = planner.estimate_value(cfg, params, jnp.repeat(z0, 100, 0), acts, mask, 0.99, jax.random.PRNGKey(4), emb)
    c1, pp = planner.prepare(cfg, params, task)
    lean = planner.estimate_value_lean(c1, pp, networks.encode(c1, pp, obs, None), acts, mask, 0.99,
                                       jax.random.PRNGKey(4))
    np.testing.assert_allclose(lean, plain, rtol=1e-5, atol=2e-4)
    assert float(jnp.std(plain)) > 1e-3  # the values are not trivially constant


def test_plan_lean_equals_plain(model):
    cfg, params = model
    lean_cfg = planner.PlannerConfig()
    plain_cfg = dataclasses.replace(lean_cfg, plain=True)
    obs = jax.random.normal(jax.random.PRNGKey(0), (24,))
    state = planner.PlanState(jax.random.uniform(jax.random.PRNGKey(5), (3, 6), minval=-1, maxval=1))
    same = 0
    for seed, task in [(0, 1), (1, 28), (2, 13), (3, 0)]:
        args = (params, obs, jnp.int32(task), state, jnp.bool_(seed % 2 == 0), jax.random.PRNGKey(seed))
        a1, s1 = planner.act_one(cfg, lean_cfg, *args)
        a2, s2 = planner.act_one(cfg, plain_cfg, *args)
        np.testing.assert_allclose(s1.prev_mean, s2.prev_mean, atol=2e-3)
        same += bool(np.allclose(a1, a2, atol=1e-4))
    assert same >= 3  # the sampled elite can flip on float noise, rarely


def test_masks_bounds_and_determinism(model):
    cfg, params = model
    pcfg = planner.PlannerConfig(iterations=2, num_samples=64, num_elites=8, num_pi_trajs=4)
    obs = jax.random.normal(jax.random.PRNGKey(0), (24,))
    st = planner.init_state(cfg, pcfg)
    task = cfg.task_index("pendulum-spin")  # 1 action dim of 6
    a1, s1 = planner.act_one(cfg, pcfg, params, obs, jnp.int32(task), st, jnp.bool_(True), jax.random.PRNGKey(1))
    a2, _ = planner.act_one(cfg, pcfg, params, obs, jnp.int32(task), st, jnp.bool_(True), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a1, a2)
    assert np.all(np.asarray(a1)[1:] == 0) and -1 <= float(a1[0]) <= 1
    assert np.all(np.asarray(s1.prev_mean)[:, 1:] == 0)
    # exploration noise outside eval mode
    walker = jnp.int32(cfg.task_index("walker-walk"))
    args = (params, obs, walker, st, jnp.bool_(True), jax.random.PRNGKey(1))
    a_eval, _ = planner.act_one(cfg, pcfg, *args)
    a_explore, _ = planner.act_one(cfg, pcfg, *args, False)
    assert np.sum(~np.isclose(a_eval, a_explore)) >= 2


def test_warm_start_shifts_previous_mean(model):
    cfg, params = model
    pcfg = planner.PlannerConfig(iterations=1, num_samples=16, num_elites=16, num_pi_trajs=0, min_std=0.05,
                                 max_std=0.05)
    prev = jnp.array([[0.9] * 6, [-0.5] * 6, [0.3] * 6])
    obs = jnp.zeros((24,))
    _, warm = planner.act_one(cfg, pcfg, params, obs, jnp.int32(0), planner.PlanState(prev), jnp.bool_(False),
                              jax.random.PRNGKey(0))
    _, cold = planner.act_one(cfg, pcfg, params, obs, jnp.int32(0), planner.PlanState(prev), jnp.bool_(True),
                              jax.random.PRNGKey(0))
    # with tiny std the refit mean stays near the initial mean: shifted prev (warm) or zeros (t0)
    np.testing.assert_allclose(warm.prev_mean[0], -0.5, atol=0.2)
    np.testing.assert_allclose(warm.prev_mean[1], 0.3, atol=0.2)
    np.testing.assert_allclose(cold.prev_mean, 0.0, atol=0.2)


def test_batch_equals_single_and_policy_prior(model, released_agent):
    cfg, params = model
    pcfg = planner.PlannerConfig(iterations=2, num_samples=32, num_elites=8, num_pi_trajs=4)
    obs = jax.random.normal(jax.random.PRNGKey(0), (3, 24))
    tasks = jnp.array([0, 12, 29], jnp.int32)
    st = planner.init_state(cfg, pcfg, 3)
    t0 = jnp.array([True, False, True])
    key = jax.random.PRNGKey(7)
    acts, states = planner.act_batch(cfg, pcfg, params, obs, tasks, st, t0, key)
    keys = jax.random.split(key, 3)
    for i in range(3):
        a, s = planner.act_one(cfg, pcfg, params, obs[i], tasks[i], planner.PlanState(st.prev_mean[i]), t0[i], keys[i])
        np.testing.assert_allclose(acts[i], a, atol=5e-5)  # float32 rounding of a vmapped vs single program
    pol = planner.PlannerConfig(mpc=False)
    acts, _ = planner.act_batch(cfg, pol, params, obs, tasks, st, t0, key)
    for i in range(3):
        mean, _ = released_agent.pi(released_agent.encode(obs[i:i + 1], int(tasks[i])), int(tasks[i]))
        np.testing.assert_allclose(acts[i], mean[0], atol=1e-5)


def test_chunking_never_changes_the_actions(model):
    """act_batch's chunk is a speed setting only: 1, 5 (every problem) and the backend default (4 of 5 on a
    CPU: a full chunk and a ragged one) agree."""
    cfg, params = model
    obs = jax.random.normal(jax.random.PRNGKey(4), (5, 24))
    tasks = jnp.array([0, 3, 12, 20, 29], jnp.int32)
    t0 = jnp.array([True, False, True, False, True])
    base = planner.PlannerConfig(iterations=1, num_samples=32, num_elites=8, num_pi_trajs=4)
    st = planner.init_state(cfg, base, 5)
    runs = {c: planner.act_batch(cfg, dataclasses.replace(base, chunk=c), params, obs, tasks, st, t0,
                                 jax.random.PRNGKey(9)) for c in (0, 1, 5)}
    for c in (1, 5):  # float32 noise only (XLA blocks the matmuls differently per batch size): 2e-5 seen
        np.testing.assert_allclose(runs[c][0], runs[0][0], atol=1e-4)
        np.testing.assert_allclose(runs[c][1].prev_mean, runs[0][1].prev_mean, atol=1e-4)


def test_chunk_default_per_backend():
    pc = planner.PlannerConfig()
    assert pc.chunk == 0
    assert pc.chunk_for(300, "cpu") == planner.CPU_CHUNK == 4 and pc.chunk_for(3, "cpu") == 4
    assert pc.chunk_for(300, "gpu") == 300 and pc.chunk_for(300, "tpu") == 300
    assert planner.PlannerConfig(chunk=16).chunk_for(300, "gpu") == 16
    with pytest.raises(ValueError, match="chunk"):
        planner.PlannerConfig(chunk=-1)


def test_random_pair_of_q_members_and_iteration_rule():
    cfg = make_model_config(1, None, obs_dim=5, action_dim=21, num_q=5, mlp_dim=32, enc_dim=32, latent_dim=16)
    params, _ = networks.init_params(cfg, jax.random.PRNGKey(0))
    pcfg = planner.PlannerConfig(iterations=1, num_samples=16, num_elites=4, num_pi_trajs=2)
    assert pcfg.iterations_for(21) == 3 and pcfg.iterations_for(6) == 1
    a, s = planner.act_one(cfg, pcfg, params, jnp.ones((5,)), jnp.int32(0), planner.init_state(cfg, pcfg),
                           jnp.bool_(True), jax.random.PRNGKey(0))
    assert a.shape == (21,) and s.prev_mean.shape == (3, 21)
    c2, qs = networks.pick_two_qs(cfg, params["qs"], jax.random.PRNGKey(3))
    assert c2.num_q == 2 and jax.tree_util.tree_leaves(qs)[0].shape[0] == 2


@pytest.mark.parametrize("kw,msg", [(dict(num_elites=600), "num_elites"), (dict(num_pi_trajs=512), "num_pi_trajs"),
                                    (dict(horizon=0), "horizon"), (dict(min_std=3.0), "min_std")])
def test_bad_planner_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        planner.PlannerConfig(**kw)


def test_discounts():
    cfg = make_model_config(1, "mt80")
    g = np.asarray(networks.discounts(cfg))
    np.testing.assert_allclose(g[:30], 0.99)
    np.testing.assert_allclose(g[30:], 0.95)


def test_scaled_keeps_the_official_proportions():
    # at the official 512 samples it is the official planner; below, one eighth elites and one sixteenth
    # policy trajectories (the make distill evaluation: 4x256 -> 32 elites, 16 policy trajectories)
    assert planner.PlannerConfig.scaled(6, 512) == planner.PlannerConfig()
    small = planner.PlannerConfig.scaled(4, 256, mpc=False)
    assert (small.iterations, small.num_samples, small.num_elites, small.num_pi_trajs, small.mpc) == (4, 256, 32, 16, False)
    assert planner.PlannerConfig.scaled(6, 4096).num_elites == 64 and planner.PlannerConfig.scaled(6, 4096).num_pi_trajs == 24
    assert planner.PlannerConfig.scaled(1, 8).num_pi_trajs == 0
