"""The planner-objective distillation terms (`distill_terms.plan_rollout`, `plan_rank`): what they match,
what they differentiate, and the planner return they centre (against `planner.estimate_value`)."""
import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import distill_terms, networks, planner
from tdmpc_jax.config import TrainConfig
from tdmpc_jax.losses import Batch

from losses_test import random_params, small_cfg

H, B = 3, 5


def _biggest(tree):
    """The largest absolute entry of a gradient tree (0: no gradient reaches it)."""
    return max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(tree))


def _ctx(scfg, sparams, tcfg_, tparams, seed=0):
    rng = np.random.RandomState(seed)
    batch = Batch(rng.randn(H + 1, B, scfg.obs_dim).astype(np.float32),
                  rng.uniform(-1, 1, (H, B, scfg.action_dim)).astype(np.float32),
                  rng.uniform(0, 2, (H, B)).astype(np.float32), rng.randint(0, scfg.num_tasks, B).astype(np.int32))
    emb = networks.embed(scfg, sparams, batch.task)
    mask = networks.action_masks(scfg)[batch.task]
    z0 = networks.encode(scfg, sparams, batch.obs[0], emb)
    tcfg = TrainConfig(horizon=H)
    rho = jnp.asarray([tcfg.rho ** t for t in range(H + 1)], jnp.float32)
    return distill_terms.Context(cfg=scfg, params=sparams, zs=jnp.broadcast_to(z0, (H + 1,) + z0.shape), emb=emb,
                                 batch=batch, mask=mask, tcfg=tcfg, rho=rho, teacher_cfg=tcfg_, teacher_params=tparams,
                                 key=jax.random.PRNGKey(seed))


def test_planner_returns_are_the_planners_estimate():
    """g_t of every imagined sequence equals `planner.estimate_value` of the teacher for that sequence
    (the planner's own value: rewards, discounts per task, Q_avg at the policy's action at the end)."""
    cfg = small_cfg()
    params, _ = random_params(cfg, 1)
    ctx = _ctx(cfg, params, cfg, params)
    r = distill_terms._plan_rollouts(ctx)
    K = distill_terms.PLAN_SEQUENCES
    # rebuild the sequences the term drew (same key schedule) and value them with the planner
    k_sig, k_eps = jax.random.split(jax.random.fold_in(ctx.key, 0x706C616E))
    sig = jnp.exp(jax.random.uniform(k_sig, (K, 1, 1), minval=jnp.log(0.05), maxval=0.0))
    eps = jax.random.normal(k_eps, (H, K, B, cfg.action_dim))
    for b in range(B):
        task = int(ctx.batch.task[b])
        emb = jnp.broadcast_to(ctx.emb[b], (K, ctx.emb.shape[-1]))
        mask = ctx.mask[b]
        z = jnp.broadcast_to(ctx.t_z[b], (K, ctx.t_z.shape[-1]))
        acts = []
        for h in range(H):
            a_pi = jnp.tanh(networks.pi_dist(cfg, params, z, emb, mask)[0])
            a = jnp.clip(jnp.where((jnp.arange(K) % 2 == 0)[:, None], a_pi + sig[:, 0] * eps[h, :, b],
                                   2.0 * eps[h, :, b]), -1, 1) * mask
            acts.append(a)
            z = networks.next_latent(cfg, params, z, a, emb)
        gamma = networks.discounts(cfg)[task]
        # terminal: the policy's mean (pi_eps 0) and the mean over both Q members (q_idx = both)
        want = planner.estimate_value(cfg, params, jnp.broadcast_to(ctx.t_z[b], (K, ctx.t_z.shape[-1])),
                                      jnp.stack(acts), mask, gamma, emb=emb, pi_eps=jnp.zeros((K, cfg.action_dim)),
                                      q_idx=jnp.arange(2))
        np.testing.assert_allclose(r["g_t"][:, b], want, rtol=1e-5, atol=1e-4)


def test_rank_is_zero_for_the_teacher_itself_and_trains_the_student_only():
    cfg = small_cfg()
    tparams, _ = random_params(cfg, 1)
    sparams, _ = random_params(cfg, 2)

    def loss(sp, tp, term):
        ctx = _ctx(cfg, sp, cfg, tp)
        return term(ctx)[0]

    assert float(loss(tparams, tparams, distill_terms.plan_rank)) < 1e-9  # self-distillation: nothing to match
    assert float(loss(sparams, tparams, distill_terms.plan_rank)) > 1e-3
    for term in (distill_terms.plan_rank, distill_terms.plan_rollout):
        f = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)  # params as jit arguments
        gs, gt = f(sparams, tparams, term)
        for part in ("dynamics", "reward_head", "qs"):  # the student's own rollout is trained
            assert _biggest(gs[part]) > 0, part
        assert _biggest(gt) == 0  # the teacher is not


def test_policy_representation_trains_the_encoder_only():
    """`policy_representation`: zero when the student is the teacher (it reads the teacher's own policy),
    positive otherwise, and its gradient reaches the student's encoder (and the task embedding the encoder
    reads) and nothing else: not pi_head, not the other heads, not the teacher."""
    cfg = small_cfg()
    tparams, _ = random_params(cfg, 1)
    sparams, _ = random_params(cfg, 2)

    def loss(sp, tp):
        return distill_terms.policy_representation(_ctx(cfg, sp, cfg, tp))[0]

    assert float(loss(tparams, tparams)) < 1e-10
    assert float(loss(sparams, tparams)) > 1e-3
    gs, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(sparams, tparams)  # params as jit arguments
    assert _biggest(gs["encoder"]) > 0
    for part in ("pi_head", "dynamics", "reward_head", "qs"):
        assert _biggest(gs[part]) == 0, part
    assert _biggest(gt) == 0
