"""TD-MPC2 losses as pure functions, built by `make_losses` (brax style).

World-model loss (reference doc §3.2-3.3): consistency, reward and value (TD targets from the target
Qs with a sampled policy action) with rho^t weighting, plus TD-MPC-Opt's distillation term(s).
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
from tdmpc_jax import networks
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

    def seq(e, T):
        return None if e is None else jnp.broadcast_to(e, (T,) + e.shape)

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

    def distillation(scfg, params, zs, emb, batch, mask, teacher_params, key):
        """scfg/params/emb: the student as `conditioned` gives it; zs: its latent rollout (H+1, B, L).

        -> (loss, metrics, policy targets). The policy terms are not in this loss: the world-model
        step does not update pi_head (a policy MSE here would only bend the encoder). Their targets,
        (T, B, A) actions for the first T latents, go to `policy`, which adds coef x MSE."""
        tc = teacher_cfg
        z0 = zs[0]
        t_emb = networks.embed(tc, teacher_params, batch.task)
        t_z = networks.encode(tc, teacher_params, batch.obs[0], t_emb)
        t_logits = networks.reward_logits(tc, teacher_params, t_z, batch.action[0], t_emb)
        s_logits = networks.reward_logits(scfg, params, z0, batch.action[0], emb)
        r_t = tmath.two_hot_inv(t_logits, tc.vmin, tc.vmax)
        r_s = tmath.two_hot_inv(s_logits, cfg.vmin, cfg.vmax)
        out = {"distill_reward_mse": jnp.mean((r_s - r_t) ** 2)}
        total = tcfg.distill_coef * out["distill_reward_mse"]
        if tcfg.distill_reward_kl_coef > 0:
            T = tcfg.distill_temperature
            pt = jax.nn.softmax(t_logits / T, -1)
            kl = jnp.sum(pt * (jnp.log(pt + 1e-12) - jax.nn.log_softmax(s_logits / T, -1)), -1).mean() * T * T
            out["distill_reward_kl"] = kl
            total += tcfg.distill_reward_kl_coef * kl
        if tcfg.distill_q_coef > 0:
            q_t = networks.q_values(tc, teacher_params["qs"], t_z, batch.action[0], t_emb).mean(0)
            q_s = networks.q_values(scfg, params["qs"], z0, batch.action[0], emb).mean(0)
            out["distill_q_mse"] = jnp.mean((q_s - q_t) ** 2)
            total += tcfg.distill_q_coef * out["distill_q_mse"]
        pi_targets = {}
        if tcfg.distill_policy_coef > 0 or tcfg.distill_value_coef > 0:
            m_t, _ = networks.pi_dist(tc, teacher_params, t_z, t_emb, mask)
            a_t = jax.lax.stop_gradient(jnp.tanh(m_t))
        if tcfg.distill_policy_coef > 0:  # the teacher policy's mean action, at t = 0
            pi_targets["distill_policy"] = a_t[None]
        if tcfg.distill_value_coef > 0:  # the teacher's value of its own policy: Q_t(z, pi_t(z))
            v_t = networks.q_values(tc, teacher_params["qs"], t_z, a_t, t_emb).mean(0)
            v_s = networks.q_values(scfg, params["qs"], z0, a_t, emb).mean(0)
            out["distill_value_mse"] = jnp.mean((v_s - v_t) ** 2)
            total += tcfg.distill_value_coef * out["distill_value_mse"]
        if tcfg.distill_model_coef > 0:
            d, o, pi_targets["distill_model"] = model_distillation(
                scfg, params, zs[:-1], emb, batch, mask, teacher_params, jax.random.fold_in(key, 0x6D6F64))
            out.update(o)
            total += tcfg.distill_model_coef * d
        if tcfg.distill_action_coef > 0:  # the teacher's own (planner) actions stored in the dataset, t < H
            pi_targets["distill_action"] = batch.action
        return total, out, pi_targets

    def model_distillation(scfg, params, zs, emb, batch, mask, teacher_params, key):
        """What MPPI reads from the model, matched to the teacher along the student's own latent rollout
        (t < H, rho^t weighted): rewards and Q values (soft cross-entropy to the teacher's decoded values,
        the scale of the model's own losses) at three actions per state (the dataset's, the teacher
        policy's mean, a uniform random one: the planner samples far from the data); the teacher
        policy's mean actions are returned as the policy's targets."""
        tc = teacher_cfg
        t_emb = seq(networks.embed(tc, teacher_params, batch.task), H)
        t_z = networks.encode(tc, teacher_params, batch.obs[:-1], t_emb)  # (H, B, Lt) from real observations
        emb_h = seq(emb, H)
        mask_h = jnp.broadcast_to(mask, (H,) + mask.shape)
        m_t, _ = networks.pi_dist(tc, teacher_params, t_z, t_emb, mask_h)
        a_pi = jax.lax.stop_gradient(jnp.tanh(m_t))
        a_rand = jax.random.uniform(key, a_pi.shape, minval=-1.0, maxval=1.0) * mask_h
        w = rho[:H] / jnp.sum(rho[:H])
        r_ce = q_ce = 0.0
        for a in (batch.action, a_pi, a_rand):
            r_t = networks.reward(tc, teacher_params, t_z, a, t_emb)
            q_t = networks.q_values(tc, teacher_params["qs"], t_z, a, t_emb).mean(0)
            r_s = networks.reward_logits(scfg, params, zs, a, emb_h)
            q_s = networks.q_logits(scfg, params["qs"], zs, a, emb_h)  # (num_q, H, B, nb)
            r_ce += jnp.sum(w * tmath.soft_ce(r_s, jax.lax.stop_gradient(r_t), nb, lo, hi).mean(-1)) / 3
            q_ce += jnp.sum(w * tmath.soft_ce(q_s, jax.lax.stop_gradient(q_t)[None], nb, lo, hi).mean((0, -1))) / 3
        return r_ce + q_ce, {"distill_model_reward_ce": r_ce, "distill_model_q_ce": q_ce}, a_pi

    pi_coefs = {"distill_policy": tcfg.distill_policy_coef, "distill_action": tcfg.distill_action_coef,
                "distill_model": tcfg.distill_model_coef}

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
