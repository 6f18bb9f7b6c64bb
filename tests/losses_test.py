"""Each loss term against an independent float64 NumPy computation on a fixed batch."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmpc_jax import networks
from tdmpc_jax.config import TrainConfig, make_model_config
from tdmpc_jax.losses import Batch, make_losses, running_scale_update

H, B = 3, 5


def small_cfg(**kw):
    base = dict(obs_dim=5, action_dim=2, latent_dim=16, enc_dim=24, mlp_dim=32, num_enc_layers=2, num_q=2,
                task_dim=8, tasks=("a", "b", "c"), action_dims=(2, 1, 2), obs_dims=(5, 3, 5),
                episode_lengths=(500, 500, 100), dropout=0.0)
    base.update(kw)
    from tdmpc_jax.config import ModelConfig
    return ModelConfig(**base)


def random_params(cfg, seed):
    params, target = networks.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]  # non-trivial heads
    params = jax.tree_util.tree_unflatten(tree, leaves)
    target = jax.tree_util.tree_map(lambda x: x * 0.9, params["qs"])
    return params, target


# ---------------- NumPy reference -------------------------------------------------------------
def np_mish(x):
    return x * np.tanh(np.log1p(np.exp(x)))


def np_layer(p, x, act):
    if "ln" not in p:
        return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    x = x @ np.asarray(p["dense"]["kernel"], np.float64) + np.asarray(p["dense"]["bias"], np.float64)
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    x = (x - m) / np.sqrt(v + 1e-5) * np.asarray(p["ln"]["scale"]) + np.asarray(p["ln"]["bias"])
    if act == "simnorm":
        s = x.reshape(x.shape[:-1] + (-1, 8))
        e = np.exp(s - s.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).reshape(x.shape)
    return np_mish(x)


def np_mlp(p, x, out_act=None):
    n = len(p)
    for i in range(n):
        x = np_layer(p[f"layer_{i}"], x, (out_act or "mish") if i == n - 1 else "mish")
    return x


def np_emb(params, task):
    e = np.asarray(params["task_emb"]["embedding"], np.float64)[task]
    n = np.linalg.norm(e, axis=-1, keepdims=True)
    return np.where(n > 1, e / (n + 1e-7), e)


def np_symlog(x):
    return np.sign(x) * np.log1p(np.abs(x))


def np_two_hot(x, nb=101, lo=-10.0, hi=10.0):
    s = np.clip(np_symlog(x), lo, hi)
    pos = (s - lo) / ((hi - lo) / (nb - 1))
    idx = np.floor(pos).astype(int)
    off = pos - idx
    out = np.zeros(x.shape + (nb,))
    np.put_along_axis(out, idx[..., None], (1 - off)[..., None], -1)
    hi_idx = (idx + 1) % nb
    cur = np.take_along_axis(out, hi_idx[..., None], -1)
    np.put_along_axis(out, hi_idx[..., None], cur + off[..., None], -1)
    return out


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_soft_ce(logits, target):
    return -(np_two_hot(target) * np_log_softmax(logits)).sum(-1)


def np_decode(logits):
    p = np.exp(np_log_softmax(logits))
    s = p @ np.linspace(-10, 10, logits.shape[-1])
    return np.sign(s) * np.expm1(np.abs(s))


def np_q(qs, x):
    ens = qs["ensemble"]
    n = np.asarray(ens["layer_0"]["dense"]["kernel"]).shape[0]
    return np.stack([np_mlp(jax.tree_util.tree_map(lambda a: np.asarray(a)[i], ens), x) for i in range(n)])


# -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    cfg = small_cfg()
    params, target = random_params(cfg, 0)
    rng = np.random.RandomState(0)
    batch = Batch(rng.randn(H + 1, B, 5).astype(np.float32), rng.uniform(-1, 1, (H, B, 2)).astype(np.float32),
                  rng.uniform(0, 2, (H, B)).astype(np.float32), np.array([0, 1, 2, 1, 0], np.int32))
    return cfg, params, target, batch


def test_world_model_terms_match_numpy(setup):
    cfg, params, target, batch = setup
    tcfg = TrainConfig(horizon=H)
    key = jax.random.PRNGKey(3)
    loss, (m, zs, pi_targets) = make_losses(cfg, tcfg).world_model(params, target, batch, key)
    assert pi_targets == {}
    # the same policy noise for the TD target's sampled action
    k_pi, _, _ = jax.random.split(key, 3)
    masks = np.array([[1, 1], [1, 0], [1, 1]], np.float64)[batch.task]
    gam = np.array([0.99, 0.99, 0.95])[batch.task]
    emb = np_emb(params, batch.task)
    obs = batch.obs.astype(np.float64)
    next_z = np.stack([np_mlp(params["encoder"], np.concatenate([obs[t + 1], emb], -1), "simnorm")
                       for t in range(H)])
    eps = np.asarray(jax.random.normal(k_pi, (H, B, 2)), np.float64) * masks
    out = np_mlp(params["pi_head"], np.concatenate([next_z, np.broadcast_to(emb, (H,) + emb.shape)], -1))
    mean, raw = out[..., :2] * masks, out[..., 2:]
    log_std = (-10 + 0.5 * 12 * (np.tanh(raw) + 1)) * masks
    a_next = np.tanh(mean + eps * np.exp(log_std))
    x = np.concatenate([next_z, np.broadcast_to(emb, (H,) + emb.shape), a_next], -1)
    q_next = np_decode(np_q(target, x)).min(0)
    td = batch.reward + gam * q_next
    z = np_mlp(params["encoder"], np.concatenate([obs[0], emb], -1), "simnorm")
    zs_np, cons = [z], 0.0
    for t in range(H):
        z = np_mlp(params["dynamics"], np.concatenate([z, emb, batch.action[t]], -1), "simnorm")
        cons += 0.5 ** t * np.mean((z - next_z[t]) ** 2)
        zs_np.append(z)
    rew = val = 0.0
    for t in range(H):
        x = np.concatenate([zs_np[t], emb, batch.action[t]], -1)
        rew += 0.5 ** t * np_soft_ce(np_mlp(params["reward_head"], x), batch.reward[t]).mean()
        for q in np_q(params["qs"], x):
            val += 0.5 ** t * np_soft_ce(q, td[t]).mean()
    cons, rew, val = cons / H, rew / H, val / (H * 2)
    np.testing.assert_allclose(m["consistency_loss"], cons, rtol=2e-4)
    np.testing.assert_allclose(m["reward_loss"], rew, rtol=2e-4)
    np.testing.assert_allclose(m["value_loss"], val, rtol=2e-4)
    np.testing.assert_allclose(loss, 20 * cons + 0.1 * rew + 0.1 * val, rtol=2e-4)
    np.testing.assert_allclose(zs, np.stack(zs_np), atol=1e-5)


def test_distillation_terms_match_numpy(setup):
    cfg, params, target, batch = setup
    tcfg_ = small_cfg(latent_dim=24, mlp_dim=40, task_dim=6)
    tparams, _ = random_params(tcfg_, 7)
    tcfg = TrainConfig(horizon=H, distill_coef=0.45, distill_q_coef=0.1, distill_policy_coef=0.2,
                       distill_reward_kl_coef=0.3, distill_temperature=2.0)
    base_loss, (base_m, _, _) = make_losses(cfg, TrainConfig(horizon=H)).world_model(
        params, target, batch, jax.random.PRNGKey(3))
    losses = make_losses(cfg, tcfg, tcfg_)
    loss, (m, model_zs, pi_targets) = losses.world_model(params, target, batch, jax.random.PRNGKey(3), tparams)
    obs0, a0 = batch.obs[0].astype(np.float64), batch.action[0].astype(np.float64)
    emb_s, emb_t = np_emb(params, batch.task), np_emb(tparams, batch.task)
    zs = np_mlp(params["encoder"], np.concatenate([obs0, emb_s], -1), "simnorm")
    zt = np_mlp(tparams["encoder"], np.concatenate([obs0, emb_t], -1), "simnorm")
    ls = np_mlp(params["reward_head"], np.concatenate([zs, emb_s, a0], -1))
    lt = np_mlp(tparams["reward_head"], np.concatenate([zt, emb_t, a0], -1))
    mse = np.mean((np_decode(ls) - np_decode(lt)) ** 2)
    pt = np.exp(np_log_softmax(lt / 2))
    kl = np.mean((pt * (np.log(pt) - np_log_softmax(ls / 2))).sum(-1)) * 4
    qs = np_decode(np_q(params["qs"], np.concatenate([zs, emb_s, a0], -1))).mean(0)
    qt = np_decode(np_q(tparams["qs"], np.concatenate([zt, emb_t, a0], -1))).mean(0)
    masks = np.array([[1, 1], [1, 0], [1, 1]], np.float64)[batch.task]
    ms = np.tanh(np_mlp(params["pi_head"], np.concatenate([zs, emb_s], -1))[:, :2] * masks)
    mt = np.tanh(np_mlp(tparams["pi_head"], np.concatenate([zt, emb_t], -1))[:, :2] * masks)
    np.testing.assert_allclose(m["distill_reward_mse"], mse, rtol=2e-4)
    np.testing.assert_allclose(m["distill_reward_kl"], kl, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(m["distill_q_mse"], np.mean((qs - qt) ** 2), rtol=2e-4)
    # the policy term trains pi_head, so it is in the policy loss: its target is the teacher's mean action
    np.testing.assert_allclose(pi_targets["distill_policy"][0], mt, atol=1e-5)
    np.testing.assert_allclose(loss - base_loss, 0.45 * mse + 0.3 * kl + 0.1 * np.mean((qs - qt) ** 2), rtol=2e-3)
    key = jax.random.PRNGKey(4)
    pi_base, _ = losses.policy({"pi_head": params["pi_head"]}, params, model_zs, batch.task, jnp.float32(1.0), key)
    pi_loss, (pm, _) = losses.policy({"pi_head": params["pi_head"]}, params, model_zs, batch.task, jnp.float32(1.0),
                                     key, pi_targets)
    np.testing.assert_allclose(pm["distill_policy_mse"], np.mean((ms - mt) ** 2), rtol=2e-4)
    np.testing.assert_allclose(pi_loss - pi_base, 0.2 * np.mean((ms - mt) ** 2), rtol=2e-3)


@pytest.mark.parametrize("variant", ["new", "old"])
def test_policy_loss_matches_numpy(setup, variant):
    cfg, params, target, batch = setup
    tcfg = TrainConfig(horizon=H, policy_loss=variant)
    zs = jax.random.uniform(jax.random.PRNGKey(1), (H + 1, B, 16))
    key = jax.random.PRNGKey(9)
    loss, (m, scale) = make_losses(cfg, tcfg).policy({"pi_head": params["pi_head"]}, params, zs, batch.task, jnp.float32(1.0), key)
    k_pi, _, _ = jax.random.split(key, 3)
    masks = np.array([[1, 1], [1, 0], [1, 1]], np.float64)[batch.task]
    emb = np.broadcast_to(np_emb(params, batch.task), (H + 1, B, 8))
    z = np.asarray(zs, np.float64)
    out = np_mlp(params["pi_head"], np.concatenate([z, emb], -1))
    mean, log_std = out[..., :2] * masks, (-10 + 6 * (np.tanh(out[..., 2:]) + 1)) * masks
    eps = np.asarray(jax.random.normal(k_pi, (H + 1, B, 2)), np.float64) * masks
    a = np.tanh(mean + eps * np.exp(log_std))
    q = np_decode(np_q(params["qs"], np.concatenate([z, emb, a], -1))).mean(0)
    x = np.sort(q[0])
    pct = lambda p: np.interp(p * (B - 1) / 100, np.arange(B), x)
    new_scale = 1.0 + 0.01 * (max(pct(95) - pct(5), 1.0) - 1.0)
    q = q / new_scale
    dims = masks.sum(-1)
    logp = (-0.5 * eps ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    if variant == "new":
        per_t = (-(1e-4 * (-logp * dims) + q)).mean(-1)
    else:
        old = ((-0.5 * eps ** 2 - log_std).sum(-1) - 0.5 * math.log(2 * math.pi)) * dims \
            - np.log(np.maximum(1 - a ** 2, 0) + 1e-6).sum(-1)
        per_t = (1e-4 * old - q).mean(-1)
    want = np.mean(0.5 ** np.arange(H + 1) * per_t)
    np.testing.assert_allclose(loss, want, rtol=2e-4)
    np.testing.assert_allclose(scale, new_scale, rtol=1e-5)


def test_running_scale():
    x = jnp.arange(101, dtype=jnp.float32)  # P5 = 5, P95 = 95
    np.testing.assert_allclose(running_scale_update(1.0, x), 1.0 + 0.01 * 89.0, rtol=1e-6)
    np.testing.assert_allclose(running_scale_update(1.0, jnp.zeros(10)), 1.0)  # floor at 1


def test_train_config_validation():
    with pytest.raises(ValueError, match="policy_loss"):
        TrainConfig(policy_loss="newest")
    with pytest.raises(ValueError, match="distill_coef"):
        TrainConfig(distill_coef=-1)
    with pytest.raises(ValueError, match="teacher config"):
        make_losses(make_model_config(1, "mt30"), TrainConfig(distill_coef=0.4))
