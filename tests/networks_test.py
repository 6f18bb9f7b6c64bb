import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmpc_jax import networks
from tdmpc_jax.config import make_model_config


@pytest.mark.parametrize("size,task_set,total", [
    (1, "mt30", 1_426_427), (1, "mt80", 1_435_067), (5, "mt30", 5_241_066), (5, "mt80", 5_389_930),
    (19, "mt30", 16_031_210), (19, "mt80", 18_970_218), (48, "mt30", 48_242_410),
    (48, "mt80", 48_791_146), (317, "mt30", 317_316_889), (317, "mt80", 317_383_129)])
def test_learnable_parameter_counts_match_official(size, task_set, total):
    cfg = make_model_config(size, task_set)
    params, target = jax.eval_shape(lambda k: networks.init_params(cfg, k), jax.random.PRNGKey(0))
    assert networks.count_params(params) == total
    assert networks.count_params(target) == networks.count_params(params["qs"])


def test_mt30_1m_group_breakdown():
    cfg = make_model_config(1, "mt30")
    params, _ = jax.eval_shape(lambda k: networks.init_params(cfg, k), jax.random.PRNGKey(0))
    groups = {k: networks.count_params(v) for k, v in params.items()}
    assert groups == {"encoder": 64_640, "dynamics": 287_616, "reward_head": 276_965, "pi_head": 240_396,
                      "qs": 553_930, "task_emb": 2_880}


def test_official_init_zero_heads_and_target_copy():
    cfg = make_model_config(1, "mt30")
    params, target = networks.init_params(cfg, jax.random.PRNGKey(1))
    assert not np.any(params["reward_head"]["layer_2"]["kernel"])
    assert not np.any(params["qs"]["ensemble"]["layer_2"]["kernel"])
    emb = np.asarray(params["task_emb"]["embedding"])
    assert emb.min() >= -0.02 and emb.max() <= 0.02 and emb.min() < -0.01
    k = np.asarray(params["dynamics"]["layer_0"]["dense"]["kernel"])
    assert abs(k.std() - 0.02) < 0.001
    for a, b in zip(jax.tree_util.tree_leaves(params["qs"]), jax.tree_util.tree_leaves(target)):
        np.testing.assert_array_equal(a, b)
    # ensemble members are initialised independently
    k0 = params["qs"]["ensemble"]["layer_0"]["dense"]["kernel"]
    assert not np.allclose(k0[0], k0[1])
    z = jnp.zeros((3, cfg.latent_dim))
    a = jnp.zeros((3, cfg.action_dim))
    emb_rows = networks.embed(cfg, params, jnp.array([0, 1, 2]))
    np.testing.assert_allclose(networks.reward(cfg, params, z, a, emb_rows), 0.0, atol=1e-6)


def test_simnorm_groups_sum_to_one():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 128)) * 5
    y = np.asarray(networks.simnorm(x, 8)).reshape(4, 16, 8)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)


def test_task_embedding_max_norm_renormalises_only_long_rows():
    rows = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    out = np.asarray(networks.renorm_max_norm(rows))
    np.testing.assert_allclose(out[0], np.array([3.0, 4.0]) / (5.0 + 1e-7), rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.3, 0.4])


def test_q_dropout_only_with_key():
    cfg = make_model_config(1, "mt30")
    params, _ = networks.init_params(cfg, jax.random.PRNGKey(0))
    # make the output head non-zero so logits depend on the hidden layers
    params["qs"]["ensemble"]["layer_2"]["kernel"] = jax.random.normal(
        jax.random.PRNGKey(2), params["qs"]["ensemble"]["layer_2"]["kernel"].shape)
    z = jax.random.normal(jax.random.PRNGKey(3), (4, cfg.latent_dim))
    a = jnp.zeros((4, cfg.action_dim))
    emb = networks.embed(cfg, params, jnp.zeros(4, jnp.int32))
    e1 = networks.q_logits(cfg, params["qs"], z, a, emb)
    e2 = networks.q_logits(cfg, params["qs"], z, a, emb)
    np.testing.assert_array_equal(e1, e2)
    d1 = networks.q_logits(cfg, params["qs"], z, a, emb, dropout_key=jax.random.PRNGKey(5))
    assert d1.shape == (cfg.num_q, 4, cfg.num_bins)
    assert not np.allclose(d1, e1)


def test_action_masks():
    cfg = make_model_config(1, "mt30")
    m = np.asarray(networks.action_masks(cfg))
    assert m.shape == (30, 6)
    np.testing.assert_array_equal(m.sum(1), cfg.action_dims)
    assert m[7].tolist() == [1, 0, 0, 0, 0, 0]


def test_single_task_model_has_no_embedding():
    cfg = make_model_config(5, None, obs_dim=24, action_dim=6)
    params, _ = jax.eval_shape(lambda k: networks.init_params(cfg, k), jax.random.PRNGKey(0))
    assert "task_emb" not in params
    assert networks.count_params(params) == 4_960_618
