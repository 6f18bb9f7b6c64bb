"""The distillation-term registry: the one place where distillation terms (TD-MPC-Opt and extras) are defined.

A term is a frozen `DistillTerm(field, flag, help, loss, policy_target)`: `field` names its coefficient
("distill_<x>_coef"), `flag` its command-line flag, `loss(ctx) -> (value, metrics, pi_target)` computes it
from a `Context` (the student as the loss sees it, the teacher, shared teacher quantities, a PRNG key).
Everything else derives from the registry: `config.DISTILL_TERMS` / `DISTILL_COEFS`, `TrainConfig`
validation, `tcfg.coef(field)` and `uses_teacher`, the flags of `experiments/distill.py` /
`experiments/pipeline.py` (`cli.distill_flags` / `cli.distill_coefficients`), and the losses:
`losses.make_losses` sums coef x value of every registered term with coef > 0 in registration order
(the built-in order below is the summation order, kept for bit-identical results) and hands each policy
target to the policy loss, which adds coef x the rho-weighted MSE of tanh(policy mean) to it.

Adding a term (no other file changes):
  1. its loss, a pure function of the `Context`:
        def latent_norm(ctx):
            d = jnp.mean((jnp.linalg.norm(ctx.z0, axis=-1) - jnp.linalg.norm(ctx.t_z, axis=-1)) ** 2)
            return d, {"distill_latent_norm": d}, None
     `value` is differentiated with respect to the student (the world-model step); `pi_target`, for a
     `policy_target=True` term, is (T, B, A) actions for the first T latents (its value may be None);
  2. `register_term(DistillTerm("distill_latent_norm_coef", "latent_norm_coef", "what it does", latent_norm))`
     (a user's module, or the end of this one for a built-in);
  3. its coefficient: `TrainConfig(distill_extra=(("distill_latent_norm_coef", 0.5),))` (the built-in terms
     keep their own `TrainConfig` fields, saved in older train states), or the flag `--latent_norm_coef`
     of distill.py / pipeline.py when the term is registered before the script defines its flags (a
     built-in, or a module imported before `cli.distill_flags` runs).
`scoped()` restores the registry on exit (for tests, or a script trying terms out).
`tests/extend_distill_test.py` registers a term from the test file and trains with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from tdmpc_jax.lazy_import import lazy

jax, jnp, tmath = lazy("jax"), lazy("jax.numpy"), lazy("tdmpc_jax.scalar_math")  # imported when a loss runs: an
# entry point defines the distillation flags (this registry) without importing JAX (tdmpc_jax.lazy_import)

# NOTE: `tdmpc_jax.networks` (which imports `tdmpc_jax.config`) is imported inside `Context`: config
# imports this module lazily, so this module never imports config or networks at import time.


def broadcast_time(e, T):
    """An embedding (or None) repeated over T time steps: (E...) -> (T, E...)."""
    return None if e is None else jnp.broadcast_to(e, (T,) + e.shape)


class Context:
    """What a term's loss reads. Student (as `losses.make_losses` conditions it: the task-folded model with
    `emb` None when fused, else the plain model and its embedding): `cfg`, `params`, `zs` (H+1, B, L) its
    latent rollout, `z0`, `emb`, `batch`, `mask` (B, A) the tasks' action mask, `tcfg`, `rho` (H+1,) the
    rho^t weights. Teacher: `teacher_cfg`, `teacher_params`. `key`: the world-model step's key (derive
    your own with `jax.random.fold_in(key, <term constant>)`). Shared teacher quantities, each computed
    once on first use: `t_emb`, `t_z` (teacher latent of obs[0]), `t_reward_logits` / `s_reward_logits`
    (teacher / student reward logits at the dataset action, t=0), `t_action` (tanh of the teacher policy's
    mean at t=0, no gradient)."""

    def __init__(self, *, cfg, params, zs, emb, batch, mask, tcfg, rho, teacher_cfg, teacher_params, key):
        self.cfg, self.params, self.zs, self.emb, self.batch, self.mask = cfg, params, zs, emb, batch, mask
        self.tcfg, self.rho, self.key = tcfg, rho, key
        self.teacher_cfg, self.teacher_params = teacher_cfg, teacher_params

    @functools.cached_property
    def z0(self):  # one slice of zs (each slice is its own gradient path: one keeps the summation order)
        return self.zs[0]

    @property
    def networks(self):
        from tdmpc_jax import networks
        return networks

    @functools.cached_property
    def t_emb(self):
        return self.networks.embed(self.teacher_cfg, self.teacher_params, self.batch.task)

    @functools.cached_property
    def t_z(self):
        return self.networks.encode(self.teacher_cfg, self.teacher_params, self.batch.obs[0], self.t_emb)

    @functools.cached_property
    def t_reward_logits(self):
        return self.networks.reward_logits(self.teacher_cfg, self.teacher_params, self.t_z, self.batch.action[0],
                                           self.t_emb)

    @functools.cached_property
    def s_reward_logits(self):
        return self.networks.reward_logits(self.cfg, self.params, self.z0, self.batch.action[0], self.emb)

    @functools.cached_property
    def t_action(self):
        m_t, _ = self.networks.pi_dist(self.teacher_cfg, self.teacher_params, self.t_z, self.t_emb, self.mask)
        return jax.lax.stop_gradient(jnp.tanh(m_t))


LossResult = Tuple[Optional[Any], Dict[str, Any], Optional[Any]]
_FIELD = re.compile(r"^distill(_[a-z0-9]+)*_coef$")


@dataclasses.dataclass(frozen=True)
class DistillTerm:
    """field: its coefficient's name ('distill_<x>_coef': a `TrainConfig` field for the built-ins, else a
    `TrainConfig.distill_extra` key); flag: its command-line flag; help: what it distils; loss: ctx ->
    (value or None, metrics, policy target or None); policy_target: the loss returns a policy target
    (named `name`, its metric `<name>_mse`); always: computed (its metrics, and 0 x value in the loss)
    whenever a teacher is used, even at coefficient 0 (the reward MSE: every distillation run's gauge)."""

    field: str
    flag: str
    help: str
    loss: Callable[[Context], LossResult]
    policy_target: bool = False
    always: bool = False

    def __post_init__(self):
        if not isinstance(self.field, str) or not _FIELD.match(self.field):
            raise ValueError(f"distillation term field {self.field!r} must look like 'distill_<name>_coef'")
        if not isinstance(self.flag, str) or not re.match(r"^[a-z][a-z0-9_]*$", self.flag):
            raise ValueError(f"distillation flag {self.flag!r} must be a lower-case identifier")
        if not callable(self.loss):
            raise TypeError(f"the loss of {self.field} is not callable")

    @property
    def name(self) -> str:
        """'distill_policy_coef' -> 'distill_policy' (its policy target's key; metric '<name>_mse')."""
        return self.field[:-len("_coef")]


# --- the registry (module-level; `scoped` restores it) ------------------------------------------

_TERMS: Dict[str, DistillTerm] = {}


def register_term(term: DistillTerm) -> DistillTerm:
    """Add a term (after every registered one); re-registering an equal term is a no-op, a different one
    under its field or flag an error."""
    if not isinstance(term, DistillTerm):
        raise TypeError(f"register_term takes a DistillTerm, got {type(term).__name__}")
    old = _TERMS.get(term.field)
    if old is not None:
        if old != term:
            raise ValueError(f"distillation term {term.field!r} is already registered as {old}")
        return old
    clash = [t.field for t in _TERMS.values() if t.flag == term.flag]
    if clash:
        raise ValueError(f"flag {term.flag!r} of {term.field!r} is already the flag of {clash[0]!r}")
    _TERMS[term.field] = term
    return term


def get_terms() -> Tuple[DistillTerm, ...]:
    """Every registered term, in registration order (the built-ins first: the summation order)."""
    return tuple(_TERMS.values())


def find_term(field) -> Optional[DistillTerm]:
    return _TERMS.get(field) if isinstance(field, str) else None


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Registrations made inside the block are undone on exit (the registry is restored in place)."""
    terms = dict(_TERMS)
    try:
        yield
    finally:
        _TERMS.clear()
        _TERMS.update(terms)


# --- the built-in terms (registration order = summation order: keep it) ---------------------------

def reward_mse(ctx: Context) -> LossResult:
    """MSE of the decoded rewards (student vs teacher) at the dataset action, t=0 (TD-MPC-Opt)."""
    tc = ctx.teacher_cfg
    r_t = tmath.two_hot_inv(ctx.t_reward_logits, tc.vmin, tc.vmax)
    r_s = tmath.two_hot_inv(ctx.s_reward_logits, ctx.cfg.vmin, ctx.cfg.vmax)
    mse = jnp.mean((r_s - r_t) ** 2)
    return mse, {"distill_reward_mse": mse}, None


def reward_kl(ctx: Context) -> LossResult:
    T = ctx.tcfg.distill_temperature
    pt = jax.nn.softmax(ctx.t_reward_logits / T, -1)
    kl = jnp.sum(pt * (jnp.log(pt + 1e-12) - jax.nn.log_softmax(ctx.s_reward_logits / T, -1)), -1).mean() * T * T
    return kl, {"distill_reward_kl": kl}, None


def q_mse(ctx: Context) -> LossResult:
    nw, tc, a0 = ctx.networks, ctx.teacher_cfg, ctx.batch.action[0]
    q_t = nw.q_values(tc, ctx.teacher_params["qs"], ctx.t_z, a0, ctx.t_emb).mean(0)
    q_s = nw.q_values(ctx.cfg, ctx.params["qs"], ctx.z0, a0, ctx.emb).mean(0)
    mse = jnp.mean((q_s - q_t) ** 2)
    return mse, {"distill_q_mse": mse}, None


def policy_mean(ctx: Context) -> LossResult:
    """The teacher policy's mean action at t=0 as the policy's target (trains pi_head, in the policy step)."""
    return None, {}, ctx.t_action[None]


def value_mse(ctx: Context) -> LossResult:
    """The teacher's value of its own policy: Q_t(z, pi_t(z)) vs the student's Q there."""
    nw, tc, a_t = ctx.networks, ctx.teacher_cfg, ctx.t_action
    v_t = nw.q_values(tc, ctx.teacher_params["qs"], ctx.t_z, a_t, ctx.t_emb).mean(0)
    v_s = nw.q_values(ctx.cfg, ctx.params["qs"], ctx.z0, a_t, ctx.emb).mean(0)
    mse = jnp.mean((v_s - v_t) ** 2)
    return mse, {"distill_value_mse": mse}, None


def model_rollout(ctx: Context) -> LossResult:
    """What MPPI reads from the model, matched to the teacher along the student's own latent rollout
    (t < H, rho^t weighted): rewards and Q values (soft cross-entropy to the teacher's decoded values,
    the scale of the model's own losses) at three actions per state (the dataset's, the teacher
    policy's mean, a uniform random one: the planner samples far from the data); the teacher
    policy's mean actions are returned as the policy's targets."""
    nw, tc, tp, batch = ctx.networks, ctx.teacher_cfg, ctx.teacher_params, ctx.batch
    scfg, params = ctx.cfg, ctx.params
    H = ctx.tcfg.horizon
    nb, lo, hi = scfg.num_bins, scfg.vmin, scfg.vmax
    key = jax.random.fold_in(ctx.key, 0x6D6F64)
    zs = ctx.zs[:-1]
    t_emb = broadcast_time(nw.embed(tc, tp, batch.task), H)
    t_z = nw.encode(tc, tp, batch.obs[:-1], t_emb)  # (H, B, Lt) from real observations
    emb_h = broadcast_time(ctx.emb, H)
    mask_h = jnp.broadcast_to(ctx.mask, (H,) + ctx.mask.shape)
    m_t, _ = nw.pi_dist(tc, tp, t_z, t_emb, mask_h)
    a_pi = jax.lax.stop_gradient(jnp.tanh(m_t))
    a_rand = jax.random.uniform(key, a_pi.shape, minval=-1.0, maxval=1.0) * mask_h
    w = ctx.rho[:H] / jnp.sum(ctx.rho[:H])
    r_ce = q_ce = 0.0
    for a in (batch.action, a_pi, a_rand):
        r_t = nw.reward(tc, tp, t_z, a, t_emb)
        q_t = nw.q_values(tc, tp["qs"], t_z, a, t_emb).mean(0)
        r_s = nw.reward_logits(scfg, params, zs, a, emb_h)
        q_s = nw.q_logits(scfg, params["qs"], zs, a, emb_h)  # (num_q, H, B, nb)
        r_ce += jnp.sum(w * tmath.soft_ce(r_s, jax.lax.stop_gradient(r_t), nb, lo, hi).mean(-1)) / 3
        q_ce += jnp.sum(w * tmath.soft_ce(q_s, jax.lax.stop_gradient(q_t)[None], nb, lo, hi).mean((0, -1))) / 3
    return r_ce + q_ce, {"distill_model_reward_ce": r_ce, "distill_model_q_ce": q_ce}, a_pi


PLAN_SEQUENCES = 8  # imagined action sequences per dataset state (half policy-based, half MPPI-like noise)


def _plan_rollouts(ctx: Context):
    """Both models' own latent rollouts under the same imagined action sequences (shared by `plan_rollout`
    and `plan_rank`, computed once per loss evaluation): from each dataset state (t=0), K=PLAN_SEQUENCES
    sequences of the planning horizon (half the teacher policy's mean plus Gaussian noise of a random scale
    in [0.05, 1], half clip(N(0, 2^2)) like MPPI's first iteration; masked to the task's action dims).
    -> dict: student reward / Q logits per step and at the end (the teacher policy's action there), the
    teacher's decoded values, and both models' planner returns G = sum_h gamma^h r_h + gamma^H Q_end."""
    cached = ctx.__dict__.get("_plan_rollouts")
    if cached is not None:
        return cached
    nw, tc, tp = ctx.networks, ctx.teacher_cfg, ctx.teacher_params
    scfg, params = ctx.cfg, ctx.params
    H, K = ctx.tcfg.horizon, PLAN_SEQUENCES
    sg = jax.lax.stop_gradient
    k_sig, k_eps = jax.random.split(jax.random.fold_in(ctx.key, 0x706C616E))

    def tile(x):
        return None if x is None else jnp.broadcast_to(x, (K,) + x.shape)

    z_s, e_s = tile(ctx.z0), tile(ctx.emb)
    z_t, e_t = sg(tile(ctx.t_z)), tile(ctx.t_emb)
    mask = tile(ctx.mask)
    gamma = nw.discounts(tc)[ctx.batch.task] if tc.multitask else nw.discounts(tc)[0]
    sig = jnp.exp(jax.random.uniform(k_sig, (K, 1, 1), minval=jnp.log(0.05), maxval=0.0))
    on_pi = (jnp.arange(K) % 2 == 0)[:, None, None]
    eps = jax.random.normal(k_eps, (H,) + mask.shape)
    out = {"r_logits": [], "q_logits": [], "r_t": [], "q_t": []}
    g_s = g_t = 0.0
    disc = jnp.ones_like(gamma)
    for h in range(H):
        a_pi = sg(jnp.tanh(nw.pi_dist(tc, tp, z_t, e_t, mask)[0]))
        a = jnp.clip(jnp.where(on_pi, a_pi + sig * eps[h], 2.0 * eps[h]), -1.0, 1.0) * mask
        r_t = sg(nw.reward(tc, tp, z_t, a, e_t))
        r_logits = nw.reward_logits(scfg, params, z_s, a, e_s)
        out["r_logits"].append(r_logits)
        out["r_t"].append(r_t)
        out["q_logits"].append(nw.q_logits(scfg, params["qs"], z_s, a, e_s))
        out["q_t"].append(sg(nw.q_values(tc, tp["qs"], z_t, a, e_t).mean(0)))
        g_t = g_t + disc * r_t
        g_s = g_s + disc * tmath.two_hot_inv(r_logits, scfg.vmin, scfg.vmax)
        disc = disc * gamma
        z_t = sg(nw.next_latent(tc, tp, z_t, a, e_t))
        z_s = nw.next_latent(scfg, params, z_s, a, e_s)
    a_end = sg(jnp.tanh(nw.pi_dist(tc, tp, z_t, e_t, mask)[0]))
    out["q_end_t"] = sg(nw.q_values(tc, tp["qs"], z_t, a_end, e_t).mean(0))
    out["q_end_logits"] = nw.q_logits(scfg, params["qs"], z_s, a_end, e_s)
    out["g_t"] = g_t + disc * out["q_end_t"]
    out["g_s"] = g_s + disc * tmath.two_hot_inv(out["q_end_logits"], scfg.vmin, scfg.vmax).mean(0)
    ctx.__dict__["_plan_rollouts"] = out
    return out


def plan_rollout(ctx: Context) -> LossResult:
    """What MPPI scores, matched on the sequences MPPI samples (`_plan_rollouts`): the student's reward and
    Q logits at every imagined step of its own rollout, and its Q at the end of the horizon, take soft
    cross-entropy to the teacher's decoded values along the teacher's rollout (rho^t weighted). Unlike
    `model_rollout`, whose off-data actions are one step away from the data's own latent path, the
    student's dynamics are trained where the planner drives them: multi-step, off-data."""
    r = _plan_rollouts(ctx)
    nb, lo, hi = ctx.cfg.num_bins, ctx.cfg.vmin, ctx.cfg.vmax
    r_ce = q_ce = 0.0
    for h in range(len(r["r_t"])):
        r_ce += ctx.rho[h] * tmath.soft_ce(r["r_logits"][h], r["r_t"][h], nb, lo, hi).mean()
        q_ce += ctx.rho[h] * tmath.soft_ce(r["q_logits"][h], r["q_t"][h][None], nb, lo, hi).mean()
    q_ce += ctx.rho[len(r["r_t"])] * tmath.soft_ce(r["q_end_logits"], r["q_end_t"][None], nb, lo, hi).mean()
    w = jnp.sum(ctx.rho)
    r_ce, q_ce = r_ce / w, q_ce / w
    return r_ce + q_ce, {"distill_plan_reward_ce": r_ce, "distill_plan_q_ce": q_ce}, None


def plan_rank(ctx: Context) -> LossResult:
    """MPPI ranks sequences by their planner return and weights elites by exp(temperature x (G - max G)):
    only differences between the sequences of one state matter, and they are small next to the value
    (cartpole-balance: Q ~ 100, one step's action changes it by ~1, 1/20 of a two-hot bin in symlog
    space, which a soft cross-entropy barely sees). This term matches those differences directly: the
    MSE between the student's and the teacher's planner returns centred over the K sequences of each
    state (raw return units, as the planner's softmax sees them)."""
    r = _plan_rollouts(ctx)
    d_s = r["g_s"] - r["g_s"].mean(0, keepdims=True)
    d_t = r["g_t"] - r["g_t"].mean(0, keepdims=True)
    mse = jnp.mean((d_s - d_t) ** 2)
    return mse, {"distill_plan_rank_mse": mse, "distill_plan_rank_spread": jnp.mean(jnp.abs(d_t))}, None


def policy_representation(ctx: Context) -> LossResult:
    """The teacher policy's mean action at t=0 read from the student's latent by the student's frozen policy
    head: MSE(tanh(pi_mean(z0)), teacher's), differentiated into the encoder only (with the task embedding
    it reads; pi_head, the rest of the student and the teacher get no gradient). The policy terms train
    pi_head on detached latents (as the official policy loss does), so the student's latent holds what its
    reward, dynamics and Q need, not necessarily what the teacher's policy reads; this term asks the encoder
    for that too. Measured at 0.23M on top of reward + policy (docs/distillation.md, "Why not 60%"): the
    policy prior rises (10.9 against 9.2, three seeds each), MPPI does not (5.2 against 4.7)."""
    sg = jax.lax.stop_gradient
    emb = None if ctx.emb is None else sg(ctx.emb)
    mean, _ = ctx.networks.pi_dist(ctx.cfg, sg(ctx.params), ctx.z0, emb, ctx.mask)
    mse = jnp.mean((jnp.tanh(mean) - ctx.t_action) ** 2)
    return mse, {"distill_policy_repr_mse": mse}, None


def dataset_action(ctx: Context) -> LossResult:
    """The teacher's own (planner) actions stored in the dataset, t < H, as the policy's targets."""
    return None, {}, ctx.batch.action


for _term in (
    DistillTerm("distill_coef", "coef", "reward MSE(student, teacher) at t=0 (TD-MPC-Opt; paper 0.4, released "
                "model 0.45)", reward_mse, always=True),
    DistillTerm("distill_reward_kl_coef", "kl_coef", "KL between the two-hot reward distributions at t=0", reward_kl),
    DistillTerm("distill_q_coef", "q_coef", "MSE of the mean Q at the dataset action, t=0", q_mse),
    DistillTerm("distill_policy_coef", "policy_coef", "policy mean vs the teacher policy's mean at t=0 (trains "
                "pi_head)", policy_mean, policy_target=True),
    DistillTerm("distill_value_coef", "value_coef", "MSE of Q at the teacher policy's action: the teacher's value",
                value_mse),
    DistillTerm("distill_model_coef", "model_coef", "rewards, Q values and policy along the whole rollout at data, "
                "teacher-policy and random actions (what MPPI reads)", model_rollout, policy_target=True),
    DistillTerm("distill_action_coef", "action_coef", "policy mean vs the dataset's (teacher-collected) actions",
                dataset_action, policy_target=True),
    DistillTerm("distill_plan_coef", "plan_coef", "rewards and Q values along both models' own rollouts under "
                "imagined MPPI-like action sequences (what the planner scores)", plan_rollout),
    DistillTerm("distill_plan_rank_coef", "plan_rank_coef", "differences between the planner returns of "
                "imagined action sequences from one state (what MPPI's elite weights depend on)", plan_rank),
    DistillTerm("distill_policy_repr_coef", "policy_repr_coef", "the teacher policy's mean read from the student's "
                "latent by its frozen policy head, t=0: trains the encoder toward what the teacher's policy reads",
                policy_representation),
):
    register_term(_term)
del _term
