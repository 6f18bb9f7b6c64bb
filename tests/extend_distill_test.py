"""New distillation terms added from this file alone (no package edit): a latent-norm match (a world-model
term) and a teacher-action match at every latent (a policy-type term), registered for the test only; their
coefficients go through `TrainConfig(distill_extra=...)`. The losses add exactly coef x their values, a
jitted update step trains with them, the command-line flags pick them up, and the registry is restored."""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmpc_jax import config, distill_terms, train
from tdmpc_jax.config import TrainConfig
from tdmpc_jax.distill_terms import DistillTerm
from tdmpc_jax.losses import Batch, make_losses

from conftest import REPO
from losses_test import random_params, small_cfg

H, B = 3, 6
MINE, MINE_PI = "distill_mine_coef", "distill_mine_pi_coef"


def latent_norm(ctx):
    """MSE between the norms of the student's and the teacher's latents of obs[0] (shared t_z)."""
    d = jnp.mean((jnp.linalg.norm(ctx.z0, axis=-1) - jnp.linalg.norm(ctx.t_z, axis=-1)) ** 2)
    return d, {"distill_mine": d}, None


def teacher_action_everywhere(ctx):
    """The teacher policy's mean action at t=0 as the target of every latent of the rollout."""
    return None, {}, jnp.broadcast_to(ctx.t_action, (ctx.zs.shape[0],) + ctx.t_action.shape)


@contextlib.contextmanager
def mine_terms():
    with distill_terms.scoped():
        distill_terms.register_term(DistillTerm(MINE, "mine_coef", "latent norm match at t=0", latent_norm))
        distill_terms.register_term(DistillTerm(MINE_PI, "mine_pi_coef", "teacher action at every latent",
                                                teacher_action_everywhere, policy_target=True))
        yield


@pytest.fixture(scope="module")
def setup():
    cfg = small_cfg()
    tc = small_cfg(latent_dim=24, mlp_dim=40, task_dim=6)
    params, target = random_params(cfg, 0)
    tparams, _ = random_params(tc, 7)
    rng = np.random.RandomState(0)
    batch = Batch(rng.randn(H + 1, B, cfg.obs_dim).astype(np.float32),
                  rng.uniform(-1, 1, (H, B, cfg.action_dim)).astype(np.float32),
                  rng.uniform(0, 2, (H, B)).astype(np.float32), rng.randint(0, cfg.num_tasks, B).astype(np.int32))
    return cfg, tc, params, target, tparams, batch


BASE = dict(horizon=H, batch_size=B, distill_coef=0.4, distill_q_coef=0.1, distill_policy_coef=0.2)


def test_loss_adds_coef_times_the_new_terms(setup):
    cfg, tc, params, target, tparams, batch = setup
    key = jax.random.PRNGKey(3)
    with mine_terms():
        tcfg = TrainConfig(**BASE, distill_extra=((MINE, 0.5), (MINE_PI, 0.3)))
        assert tcfg.coef(MINE) == 0.5 and tcfg.coef(MINE_PI) == 0.3 and tcfg.coef("distill_q_coef") == 0.1
        assert config.DISTILL_TERMS[MINE] == ("mine_coef", "latent norm match at t=0")
        losses, plain = make_losses(cfg, tcfg, tc), make_losses(cfg, TrainConfig(**BASE), tc)
        wm = jax.jit(lambda lo, p: lo.world_model(p, target, batch, key, tparams), static_argnums=0)
        loss, (m, zs, pi_t) = wm(losses, params)
        loss0, (m0, _, pi_t0) = wm(plain, params)
    assert set(m) - set(m0) == {"distill_mine"}
    for k in m0:  # the built-in terms are untouched (bit for bit)
        if k != "total_loss":
            np.testing.assert_array_equal(m[k], m0[k], err_msg=k)
    mine = float(m["distill_mine"])
    zs0 = np.asarray(zs[0], np.float64)
    tz = np.asarray(distill_terms.Context(cfg=cfg, params=params, zs=zs, emb=None, batch=batch, mask=None, tcfg=tcfg,
                                          rho=None, teacher_cfg=tc, teacher_params=tparams, key=key).t_z, np.float64)
    np.testing.assert_allclose(mine, np.mean((np.linalg.norm(zs0, axis=-1) - np.linalg.norm(tz, axis=-1)) ** 2),
                               rtol=1e-4)
    assert mine > 0
    np.testing.assert_allclose(loss - loss0, 0.5 * mine, rtol=1e-4, atol=1e-6)
    assert set(pi_t) == {"distill_policy", "distill_mine_pi"} and set(pi_t0) == {"distill_policy"}
    assert pi_t["distill_mine_pi"].shape == (H + 1, B, cfg.action_dim)
    # the policy-type term: coef x its rho-weighted MSE, its metric '<name>_mse'
    k = jax.random.PRNGKey(4)
    pol = jax.jit(lambda lo, t: lo.policy({"pi_head": params["pi_head"]}, params, zs, batch.task, jnp.float32(1.0),
                                          k, t), static_argnums=0)
    pl, (pm, _) = pol(losses, pi_t)
    pl0, (pm0, _) = pol(plain, pi_t0)
    np.testing.assert_array_equal(pm["distill_policy_mse"], pm0["distill_policy_mse"])
    np.testing.assert_allclose(pl - pl0, 0.3 * pm["distill_mine_pi_mse"], rtol=1e-4, atol=1e-7)
    assert pm["distill_mine_pi_mse"] > 0


def test_jitted_update_step_trains_with_the_new_terms(setup):
    cfg, tc, params, target, tparams, batch = setup
    with mine_terms():
        tcfg = TrainConfig(**BASE, distill_extra=((MINE, 0.5), (MINE_PI, 0.3)))
        runs = {}
        for name, t in (("mine", tcfg), ("plain", TrainConfig(**BASE))):
            state = train.init_train_state(cfg, t, params=params, target_qs=target)
            update = jax.jit(train.make_update(cfg, t, tc))  # params and teacher params enter as arguments
            for k in range(2):
                state, metrics = update(state, batch, jax.random.PRNGKey(k), tparams)
            runs[name] = (state, metrics)
    (state, metrics), (state0, metrics0) = runs["mine"], runs["plain"]
    assert {"distill_mine", "distill_mine_pi_mse"} <= set(metrics) and "distill_mine" not in metrics0
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
    diff = [not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(state.params),
                                                      jax.tree_util.tree_leaves(state0.params))]
    assert any(diff)
    assert int(state.step) == 2


def test_registry_restored_and_train_config_checks():
    fields = config.DISTILL_COEFS
    with mine_terms():
        assert config.DISTILL_COEFS == fields + (MINE, MINE_PI)  # registration order: after the built-ins
        tcfg = TrainConfig(distill_extra=[[MINE, 1]])  # JSON form -> hashable tuples
        assert tcfg.distill_extra == ((MINE, 1.0),) and tcfg.uses_teacher and hash(tcfg)
        d = json.loads(json.dumps(dataclasses.asdict(tcfg)))  # as runs.write_state saves it
        assert TrainConfig(**d) == tcfg
        assert TrainConfig(**TrainConfig.distill_kwargs({"distill_coef": 0.4, MINE: 0.5, MINE_PI: 0.0})) == \
            TrainConfig(distill_coef=0.4, distill_extra=((MINE, 0.5),))
        for extra, match in [(((MINE, -1.0),), "must be >= 0"), (((MINE, 1.0), (MINE, 2.0)), "twice"),
                             ((("distill_q_coef", 1.0),), "set distill_q_coef="),
                             ((("distill_bogus_coef", 1.0),), "not a registered")]:
            with pytest.raises(ValueError, match=match):
                TrainConfig(distill_extra=extra)
        with pytest.raises(ValueError, match="already registered"):
            distill_terms.register_term(DistillTerm(MINE, "other", "x", latent_norm))
        with pytest.raises(ValueError, match="already the flag"):
            distill_terms.register_term(DistillTerm("distill_other_coef", "coef", "x", latent_norm))
        with pytest.raises(ValueError, match="distill_<name>_coef"):
            DistillTerm("mine", "mine", "x", latent_norm)
    assert config.DISTILL_COEFS == fields and distill_terms.find_term(MINE) is None
    with pytest.raises(ValueError, match="not a registered"):
        TrainConfig(distill_extra=((MINE, 1.0),))
    old = dataclasses.asdict(TrainConfig(distill_coef=0.45))
    del old["distill_extra"]  # metadata written before the field existed
    assert TrainConfig(**old) == TrainConfig(distill_coef=0.45) and not TrainConfig().uses_teacher


def test_flags_of_registered_terms():
    """A term registered before `cli.distill_flags` runs gets its flag; distill_coefficients routes it to
    distill_extra (built-in coefficients stay fields)."""
    code = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from absl import flags
from tdmpc_jax import cli, distill_terms
from extend_distill_test import mine_terms
with mine_terms():
    names = cli.distill_flags(coef=0.4)
    flags.FLAGS(["prog", "--mine_coef=0.5", "--q_coef=0.1"])
    print(names)
    print(sorted(cli.distill_coefficients(True).items()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names, coefs = out.stdout.strip().splitlines()[-2:]
    assert "'mine_coef'" in names and "'mine_pi_coef'" in names and "'model_coef'" in names
    assert "('distill_extra', (('distill_mine_coef', 0.5),))" in coefs
    assert "('distill_coef', 0.4)" in coefs and "('distill_q_coef', 0.1)" in coefs
