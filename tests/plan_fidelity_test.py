"""plan_fidelity: the student-vs-teacher ranking of MPPI candidates, pinned to the plain computation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import networks, plan_fidelity, planner

TEACHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "teacher-mt4")
PCFG = planner.PlannerConfig(iterations=2, num_samples=32, num_elites=4, num_pi_trajs=2)


@pytest.fixture(scope="module")
def setup():
    teacher = tdmpc_jax.load_checkpoint(TEACHER)
    obs, ret = plan_fidelity.visited_states(teacher, "cartpole-balance", PCFG, steps=6, seed=3)
    return teacher, obs, ret


def _perturbed(agent, scale, seed=0):
    leaves, tree = jax.tree_util.tree_flatten(agent.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [np.asarray(x) + scale * np.std(x) * np.asarray(jax.random.normal(k, np.shape(x))) for x, k in zip(leaves, keys)]
    return agent.__class__(agent.config, jax.tree_util.tree_unflatten(tree, noisy), agent.target_qs, agent.metadata)


def test_visited_states_are_the_episode_observations(setup):
    teacher, obs, ret = setup
    assert obs.shape == (6, teacher.config.obs_dim) and np.all(np.isfinite(obs)) and np.isfinite(ret)
    assert not np.allclose(obs[0], obs[-1])  # the cart moved


def test_a_teacher_ranks_exactly_like_itself(setup):
    teacher, obs, _ = setup
    r = plan_fidelity.rank_fidelity(teacher, teacher, obs, teacher.config.task_index("cartpole-balance"), 0, PCFG, 64)
    np.testing.assert_allclose(r["corr"], 1.0, atol=1e-5)
    np.testing.assert_array_equal(r["regret"], 0.0)


def test_fidelity_matches_a_plain_recomputation(setup):
    """corr and regret per state equal numpy's on planner.estimate_value's G of the same candidates."""
    teacher, obs, _ = setup
    student = _perturbed(teacher, 0.3)
    ti, n = teacher.config.task_index("cartpole-balance"), 48
    r = plan_fidelity.rank_fidelity(student, teacher, obs[:3], ti, 5, PCFG, n)
    assert np.all(r["corr"] < 0.999) and np.all(r["corr"] > -1.0)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    for i in range(3):
        a = plan_fidelity.candidates(teacher.config, PCFG, ti, keys[i], n)
        assert a.shape == (PCFG.horizon, n, teacher.config.action_dim) and float(jnp.abs(a).max()) <= 1.0
        g = []
        for agent in (student, teacher):
            cfg, p = agent.config, jax.tree_util.tree_map(jnp.asarray, agent.params)
            emb = networks.embed(cfg, p, jnp.full((n,), ti))
            z = networks.encode(cfg, p, jnp.repeat(jnp.asarray(obs[i])[None], n, 0), emb)
            g.append(np.asarray(planner.estimate_value(cfg, p, z, a, networks.task_action_mask(cfg, ti),
                                                       networks.discounts(cfg)[ti], emb=emb,
                                                       pi_eps=jnp.zeros((n, cfg.action_dim)), q_idx=jnp.arange(2))))
        g_s, g_t = g
        np.testing.assert_allclose(r["corr"][i], np.corrcoef(g_s, g_t)[0, 1], atol=1e-4)
        np.testing.assert_allclose(r["regret"][i], (g_t.max() - g_t[np.argmax(g_s)]) / (g_t.std() + 1e-6), rtol=1e-3,
                                   atol=1e-3)  # a difference of near-equal float32 returns
