"""TD-MPC2 losses as pure functions, built by `make_losses` (brax style).

World-model loss (reference doc §3.2-3.3): consistency, reward and value (TD targets from the target
Qs with a sampled policy action) with rho^t weighting, plus the distillation terms: every term registered in `tdmpc_jax.distill_terms`
(where a new term is added, in one place) with a coefficient > 0 (`TrainConfig.coef`), summed in
registration order; policy-type terms hand their targets to the policy loss.
Policy loss (§3.5): Q_avg of a sampled action scaled by a RunningScale, with the 'new' scaled
entropy or the 'old' log-prob. Differences from the official code, on purpose:
* distillation reuses the student's z_0 instead of a second identical encode (same value and gradient);
* by default the policy loss does not leak task-embedding gradients into the next model step (a quirk
  of the official 'new' code; `TrainConfig.policy_emb_leak=True` reproduces it: `policy` then also
  differentiates the embedding and `train.make_update` carries that gradient into the next step).
The max-norm embedding rows are written back into the params by `train.make_update` before each pass
that looks them up (as PyTorch does in place), so the losses read plain rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from tdmpc_jax import scalar_math as tmath
from tdmpc_jax import distill_terms, networks
from tdmpc_jax.config import ModelConfig, TrainConfig


class Batch(NamedTuple):
    obs: jax.Array     # (H+1, B, O)
    action: jax.Array  # (H, B, A)
    reward: jax.Array  # (H, B)
    task: jax.Array    # (B,) int32


class Losses(NamedTuple):
    world_model: callable  # (params, target_qs, batch, key, teacher_params) -> (loss, (metrics, zs, pi_targets))
    policy: callable       # (trainable, params, zs, task, scale, key, pi_targets) -> (loss, (metrics, new_scale))


def running_scale_update(value, x, tau: float = 0.01):
    """RunningScale: value += tau * (max(P95 - P5, 1) - value), percentiles by linear interpolation."""
    x = jnp.sort(x.reshape(-1))
    n = x.shape[0]

    def pct(p):
        pos = p * (n - 1) / 100.0
        lo = jnp.floor(pos).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, n - 1)
        w = pos - lo
        return x[lo] * (1 - w) + x[hi] * w
    new = jnp.maximum(pct(95.0) - pct(5.0), 1.0)
    return value + tau * (new - value)


def make_losses(cfg: ModelConfig, tcfg: TrainConfig, teacher_cfg: Optional[ModelConfig] = None,
                fused: bool = True) -> Losses:
    """fused (default): the student's task embedding enters as per-sample first-layer biases
    (`networks.fold_task_batch`: same math, fewer FLOPs); fused=False concatenates it to every
    first layer's input as the official code does (the reference the tests compare against)."""
    H, nb, lo, hi = tcfg.horizon, cfg.num_bins, cfg.vmin, cfg.vmax
    rho = jnp.asarray([tcfg.rho ** t for t in range(H + 1)], jnp.float32)
    gammas = networks.discounts(cfg)
    if tcfg.uses_teacher and teacher_cfg is None:
        raise ValueError("distillation coefficients > 0 need a teacher config")

    def conditioned(params, task, target_qs=None):
        """-> (cfg, params, target_qs, emb) for the student's forwards: the task-folded single-task
        form with emb None (fused), or the plain multi-task model and its looked-up embedding."""
        if fused and cfg.multitask:
            if target_qs is None:
                return (*networks.fold_task_batch(cfg, params, task), None, None)
            return (*networks.fold_task_batch(cfg, params, task, target_qs), None)
        return cfg, params, target_qs, networks.embed(cfg, params, task)

    seq = distill_terms.broadcast_time  # (E...) -> (T, E...); None stays None

    def world_model(params, target_qs, batch: Batch, key, teacher_params=None):
        k_pi, k_qsel, k_drop = jax.random.split(key, 3)
        mask = networks.task_action_mask(cfg, batch.task)
        gamma = gammas[batch.task] if cfg.multitask else gammas[0]
        mcfg, mp, target_qs, emb = conditioned(params, batch.task, target_qs)
        # targets (no gradient; eval mode)
        sg = jax.lax.stop_gradient(mp)
        emb_next = None if emb is None else seq(jax.lax.stop_gradient(emb), H)
        next_z = networks.encode(mcfg, sg, batch.obs[1:], emb_next)  # (H, B, L)
        mask_h = jnp.broadcast_to(mask, (H,) + mask.shape)
        a_next, _, _ = networks.pi_sample(mcfg, sg, next_z, emb_next, mask_h, k_pi)
        qcfg, tq = networks.pick_two_qs(mcfg, target_qs, k_qsel)
        q_next = networks.q_values(qcfg, tq, next_z, a_next, emb_next).min(0)  # (H, B)
        td_target = jax.lax.stop_gradient(batch.reward + gamma * q_next)
        # latent rollout
        z = networks.encode(mcfg, mp, batch.obs[0], emb)
        zs, consistency = [z], 0.0
        for t in range(H):
            z = networks.next_latent(mcfg, mp, z, batch.action[t], emb)
            consistency += rho[t] * jnp.mean((z - next_z[t]) ** 2)
            zs.append(z)
        zs = jnp.stack(zs)  # (H+1, B, L)
        emb_h = seq(emb, H)
        r_logits = networks.reward_logits(mcfg, mp, zs[:-1], batch.action, emb_h)  # (H, B, nb)
        q_logits = networks.q_logits(mcfg, mp["qs"], zs[:-1], batch.action, emb_h, dropout_key=k_drop)
        reward_loss = jnp.sum(rho[:H] * tmath.soft_ce(r_logits, batch.reward, nb, lo, hi).mean(-1))
        value_loss = jnp.sum(rho[:H] * tmath.soft_ce(q_logits, td_target[None], nb, lo, hi).mean(-1))
        consistency, reward_loss = consistency / H, reward_loss / H
        value_loss = value_loss / (H * cfg.num_q)
        total = (tcfg.consistency_coef * consistency + tcfg.reward_coef * reward_loss
                 + tcfg.value_coef * value_loss)
        metrics = {"consistency_loss": consistency, "reward_loss": reward_loss, "value_loss": value_loss}
        pi_targets = {}
        if tcfg.uses_teacher:
            d_total, d_metrics, pi_targets = distillation(mcfg, mp, zs, emb, batch, mask, teacher_params, key)
            total = total + d_total
            metrics.update(d_metrics)
        metrics["total_loss"] = total
        return total, (metrics, jax.lax.stop_gradient(zs), pi_targets)

    # the registered distillation terms (tdmpc_jax.distill_terms), read now: coef > 0, or reported always
    terms = [(t, tcfg.coef(t.field)) for t in distill_terms.get_terms()]
    active = [(t, c) for t, c in terms if c > 0 or (t.always and tcfg.uses_teacher)]
    pi_coefs = {t.name: c for t, c in active if t.policy_target}

    def distillation(scfg, params, zs, emb, batch, mask, teacher_params, key):
        """scfg/params/emb: the student as `conditioned` gives it; zs: its latent rollout (H+1, B, L).

        -> (loss, metrics, policy targets): coef x value summed over the registered terms in registration
        order. The policy terms are not in this loss: the world-model step does not update pi_head (a
        policy MSE here would only bend the encoder). Their targets, (T, B, A) actions for the first T
        latents, go to `policy`, which adds coef x MSE."""
        ctx = distill_terms.Context(cfg=scfg, params=params, zs=zs, emb=emb, batch=batch, mask=mask, tcfg=tcfg,
                                    rho=rho, teacher_cfg=teacher_cfg, teacher_params=teacher_params, key=key)
        total, out, pi_targets = None, {}, {}
        for term, coef in active:
            value, metrics, target = term.loss(ctx)
            out.update(metrics)
            if value is not None:  # an `always` term at coef 0 adds 0 x value, as the code always did
                total = coef * value if total is None else total + coef * value
            if coef > 0 and term.policy_target and target is not None:
                pi_targets[term.name] = target
        return (0.0 if total is None else total), out, pi_targets

    def policy(trainable, params, zs, task, scale, key, pi_targets=None):
        """trainable: {'pi_head'} (+ {'task_emb'} for the official leak); everything else is frozen.
        pi_targets: the world model's policy-distillation targets {term: (T, B, A)} (coef x MSE of
        tanh(mean) over the first T latents, rho^t weighted)."""
        k_pi, k_qsel, k_drop = jax.random.split(key, 3)
        p = dict(jax.lax.stop_gradient(params), **trainable)
        T1 = zs.shape[0]
        mcfg, p, _, emb = conditioned(p, task)
        emb = seq(emb, T1)
        mask = networks.task_action_mask(cfg, task)
        mask = jnp.broadcast_to(mask, (T1,) + mask.shape)
        mean, log_std = networks.pi_dist(mcfg, p, zs, emb, mask)
        eps = jax.random.normal(k_pi, mean.shape) * mask
        action = jnp.tanh(mean + eps * jnp.exp(log_std))
        logp = tmath.gaussian_logprob(eps, log_std)  # pre-squash, summed over all A dims
        qcfg, qs = networks.pick_two_qs(mcfg, p["qs"], k_qsel)
        q = networks.q_values(qcfg, qs, zs, action, emb, dropout_key=k_drop, action_grad_only=fused)
        q = q.mean(0)  # (H+1, B)
        new_scale = running_scale_update(scale, jax.lax.stop_gradient(q[0]), tcfg.scale_tau)
        q = q / new_scale
        if tcfg.policy_loss == "new":
            dims = mask.sum(-1)
            scaled_entropy = -logp * dims
            per_t = jnp.mean(-(tcfg.entropy_coef * scaled_entropy + q), axis=-1)
            entropy = jnp.mean(scaled_entropy)
        else:
            dims = mask.sum(-1)
            old_logp = (jnp.sum(-0.5 * eps ** 2 - log_std, -1) - tmath.LOG_SQRT_2PI) * dims \
                - tmath.squash_correction(action)
            per_t = jnp.mean(tcfg.entropy_coef * old_logp - q, axis=-1)
            entropy = -jnp.mean(old_logp)
        loss = jnp.mean(rho[:T1] * per_t)
        metrics = {"pi_loss": loss, "pi_entropy": entropy, "pi_scale": new_scale, "pi_log_std": jnp.mean(log_std)}
        for name, target in (pi_targets or {}).items():
            T = target.shape[0]
            w = rho[:T] / jnp.sum(rho[:T])
            mse = jnp.sum(w * jnp.mean((jnp.tanh(mean[:T]) - target) ** 2, (-1, -2)))
            metrics[f"{name}_mse"] = mse
            loss = loss + pi_coefs[name] * mse
        return loss, (metrics, new_scale)

    return Losses(world_model, policy)
