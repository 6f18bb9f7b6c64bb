"""MPPI planning and policy-prior acting as pure, jit-able functions with explicit state and keys.

`plan` follows the official TD-MPC2 `_plan` (reference doc §4): policy trajectories, warm start from
the previous mean, elite refit with temperature, multi-task masks, elite sampling for the final action
and exploration noise outside eval mode. Deliberate differences (documented in the README):
* the task embedding is folded into first-layer biases once per call (`networks.condition_on_task`);
* the 24 policy trajectories are valued once per call (their terminal policy action is drawn once,
  not once per iteration), since their actions do not change across iterations.
`plan_batch` vmaps it over independent problems (tasks, episodes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tdmpc_jax import math as tmath
from tdmpc_jax import networks
from tdmpc_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    horizon: int = 3
    iterations: int = 6
    num_samples: int = 512
    num_elites: int = 64
    num_pi_trajs: int = 24
    temperature: float = 0.5
    min_std: float = 0.05
    max_std: float = 2.0
    mpc: bool = True
    plain: bool = False  # the official computation (task emb concatenated, pi trajectories re-valued)
    chunk: int = 4       # MPPI problems vmapped together in act_batch (lax.map over chunks keeps caches warm)

    def __post_init__(self):
        if self.horizon < 1 or self.iterations < 1 or self.num_elites < 1:
            raise ValueError("horizon, iterations and num_elites must be >= 1")
        if not 0 <= self.num_pi_trajs < self.num_samples:
            raise ValueError(f"num_pi_trajs ({self.num_pi_trajs}) must be in [0, num_samples={self.num_samples})")
        if self.num_elites > self.num_samples:
            raise ValueError(f"num_elites ({self.num_elites}) exceeds num_samples ({self.num_samples})")
        if not self.min_std <= self.max_std:
            raise ValueError("min_std must be <= max_std")
        if self.chunk < 1:
            raise ValueError("chunk must be >= 1")

    def iterations_for(self, action_dim: int) -> int:
        return self.iterations + (2 if action_dim >= 20 else 0)


class PlanState(NamedTuple):
    prev_mean: jax.Array  # (H, A)


def init_state(cfg: ModelConfig, pcfg: PlannerConfig, batch: int | None = None) -> PlanState:
    shape = (pcfg.horizon, cfg.action_dim) if batch is None else (batch, pcfg.horizon, cfg.action_dim)
    return PlanState(jnp.zeros(shape, jnp.float32))


def _mask(cfg, task):
    return networks.action_masks(cfg)[task] if cfg.multitask else jnp.ones((cfg.action_dim,), jnp.float32)


# --- the lean path: fused first layers of heads that share an input ------------------------------

def _fuse(layers):
    """First NormedLinears sharing one input -> one wide kernel (in, n*out) and bias."""
    k = jnp.concatenate([l["dense"]["kernel"] for l in layers], axis=-1)
    b = jnp.concatenate([l["dense"]["bias"] for l in layers], axis=-1)
    return k, b


def _tails(p_heads, h, out_acts, simnorm_dim):
    """Split a fused first-layer output between heads; finish each head with its own layers."""
    outs, width = [], h.shape[-1] // len(p_heads)
    for i, (p, act) in enumerate(zip(p_heads, out_acts)):
        x = networks.normed_act(p["layer_0"]["ln"], h[..., i * width:(i + 1) * width])
        rest = {f"layer_{j - 1}": p[f"layer_{j}"] for j in range(1, len(p))}
        outs.append(networks.mlp_forward(rest, x, act, simnorm_dim))
    return outs


def prepare(cfg, params, task):
    """Per-problem planning params: task folded in; reward+dynamics first layers fused."""
    cfg1, p1 = networks.condition_on_task(cfg, params, task)
    rd_k, rd_b = _fuse([p1["reward_head"]["layer_0"], p1["dynamics"]["layer_0"]])
    return cfg1, dict(p1, rd_kernel=rd_k, rd_bias=rd_b)


def _reward_and_next(cfg1, pp, first):
    """first: the fused first-layer pre-activation (N, 2M) -> (reward (N,), next z (N, L))."""
    logits, z = _tails([pp["reward_head"], pp["dynamics"]], first, [None, "simnorm"], cfg1.simnorm_dim)
    return tmath.two_hot_inv(logits, cfg1.vmin, cfg1.vmax), z


def _q_avg(cfg1, qs, z, a):
    """Mean decoded value of the (two) members in `qs`; their first layers run as one matmul."""
    ens = qs["ensemble"]
    n = jax.tree_util.tree_leaves(ens)[0].shape[0]
    x = jnp.concatenate([z, a], -1)
    k = jnp.moveaxis(ens["layer_0"]["dense"]["kernel"], 0, -2).reshape(x.shape[-1], -1)  # (in, n*M)
    h = (networks.matmul(x, k) + ens["layer_0"]["dense"]["bias"].reshape(-1)).reshape(x.shape[0], n, -1)
    tail = lambda p, hm: _tails([p], hm, [None], cfg1.simnorm_dim)[0]
    logits = jax.vmap(tail, in_axes=(0, 1))(ens, h)  # (n, N, nb)
    return tmath.two_hot_inv(logits, cfg1.vmin, cfg1.vmax).mean(0)


def estimate_value_lean(cfg1, pp, z0, actions, mask, gamma, key):
    """Same value as `estimate_value` for N sequences starting from ONE latent z0 (1, L).

    Step 0 shares z0 across all sequences, so its first layer is z0 @ W_z (once) + a @ W_a.
    """
    L = z0.shape[-1]
    G, disc = 0.0, 1.0
    mm = networks.matmul
    H = actions.shape[0]
    first = mm(z0, pp["rd_kernel"][:L]) + pp["rd_bias"] + mm(actions[0], pp["rd_kernel"][L:])
    for t in range(H):
        r, z = _reward_and_next(cfg1, pp, first)
        G = G + disc * r
        disc = disc * gamma
        if t + 1 < H:
            first = mm(jnp.concatenate([z, actions[t + 1]], -1), pp["rd_kernel"]) + pp["rd_bias"]
    k_pi, k_q = jax.random.split(key)
    a, _, _ = networks.pi_sample(cfg1, pp, z, None, mask, k_pi)
    _, qs = networks.pick_two_qs(cfg1, pp["qs"], k_q)
    return jnp.nan_to_num(G + disc * _q_avg(cfg1, qs, z, a), nan=0.0)


def plan(cfg: ModelConfig, pcfg: PlannerConfig, params, obs, task, state: PlanState, t0, key,
         eval_mode: bool = True):
    """One MPPI action for one problem: obs (O,), task () int, t0 () bool -> (action (A,), state)."""
    if pcfg.plain:
        cfg1, pp = cfg, params
        emb = networks.embed(cfg, params, jnp.reshape(task, (1,)))
        z0 = networks.encode(cfg, params, obs[None], emb)

        def value(z_first, actions, k):
            n = actions.shape[1]
            e = None if emb is None else jnp.repeat(emb, n, 0)
            return estimate_value(cfg, params, jnp.repeat(z_first, n, 0), actions, mask, gamma, k, e)

        def rollout_pi(z, k):
            e = None if emb is None else jnp.repeat(emb, z.shape[0], 0)
            a, _, _ = networks.pi_sample(cfg, params, z, e, mask, k)
            return a, (lambda a_: networks.next_latent(cfg, params, z, a_, e))
    else:
        cfg1, pp = prepare(cfg, params, task)
        z0 = networks.encode(cfg1, pp, obs[None], None)  # (1, L)

        def value(z_first, actions, k):
            return estimate_value_lean(cfg1, pp, z_first, actions, mask, gamma, k)

        def rollout_pi(z, k):
            a, _, _ = networks.pi_sample(cfg1, pp, z, None, mask, k)
            return a, (lambda a_: networks.next_latent(cfg1, pp, z, a_, None))
    mask = _mask(cfg, task)
    gamma = networks.discounts(cfg)[task] if cfg.multitask else networks.discounts(cfg)[0]
    H, A, N, P = pcfg.horizon, cfg.action_dim, pcfg.num_samples, pcfg.num_pi_trajs
    k_pi, k_pival, key = jax.random.split(key, 3)

    # policy trajectories: their actions do not change across iterations, so value them once
    if P > 0:
        z = jnp.repeat(z0, P, axis=0)
        pi_actions = []
        for t, k in enumerate(jax.random.split(k_pi, H)):
            a, step = rollout_pi(z, k)
            pi_actions.append(a)
            if t < H - 1:
                z = step(a)
        pi_actions = jnp.stack(pi_actions) * mask  # (H, P, A)
        pi_value = value(z0, pi_actions, k_pival)
    mean = jnp.where(t0, jnp.zeros((H, A), jnp.float32),
                     jnp.concatenate([state.prev_mean[1:], jnp.zeros((1, A), jnp.float32)]))
    std = jnp.full((H, A), pcfg.max_std, jnp.float32)

    def iteration(carry, k):
        mean, std, _, _ = carry
        k_s, k_v = jax.random.split(k)
        eps = jax.random.normal(k_s, (H, N - P, A), jnp.float32)
        sampled = jnp.clip(mean[:, None] + std[:, None] * eps, -1.0, 1.0) * mask
        val = value(z0, sampled, k_v)
        if P > 0:
            actions = jnp.concatenate([pi_actions, sampled], axis=1)
            pv = value(z0, pi_actions, k_pival) if pcfg.plain else pi_value
            val = jnp.concatenate([pv, val])
        else:
            actions = sampled
        elite_value, elite_idx = jax.lax.top_k(val, pcfg.num_elites)
        elites = actions[:, elite_idx]  # (H, E, A)
        score = jnp.exp(pcfg.temperature * (elite_value - elite_value.max()))
        score = score / score.sum()
        denom = score.sum() + 1e-9
        mean = jnp.einsum("e,hea->ha", score, elites) / denom
        std = jnp.sqrt(jnp.einsum("e,hea->ha", score, (elites - mean[:, None]) ** 2) / denom)
        std = jnp.clip(std, pcfg.min_std, pcfg.max_std)
        return (mean * mask, std * mask, elites, score), None

    k_iter, k_choice, k_noise = jax.random.split(key, 3)
    init = (mean, std, jnp.zeros((H, pcfg.num_elites, A)), jnp.zeros((pcfg.num_elites,)))
    (mean, std, elites, score), _ = jax.lax.scan(iteration, init, jax.random.split(k_iter, pcfg.iterations_for(A)))
    idx = jax.random.categorical(k_choice, jnp.log(score))
    a = elites[0, idx]
    if not eval_mode:
        a = a + std[0] * jax.random.normal(k_noise, (A,), jnp.float32)
    return jnp.clip(a, -1.0, 1.0), PlanState(mean)


def estimate_value(cfg, params, z, actions, mask, gamma, key, emb=None):
    """Plain value of N sequences: H-step model return + gamma^H * Q_avg(z_H, pi(z_H)).

    z (N, L), actions (H, N, A), emb (N, T) or None: the official computation.
    """
    G, disc = 0.0, 1.0
    for t in range(actions.shape[0]):
        G = G + disc * networks.reward(cfg, params, z, actions[t], emb)
        z = networks.next_latent(cfg, params, z, actions[t], emb)
        disc = disc * gamma
    k_pi, k_q = jax.random.split(key)
    a, _, _ = networks.pi_sample(cfg, params, z, emb, mask, k_pi)
    qcfg, qs = networks.pick_two_qs(cfg, params["qs"], k_q)
    q = networks.q_values(qcfg, qs, z, a, emb).mean(0)
    return jnp.nan_to_num(G + disc * q, nan=0.0)


def policy_act(cfg: ModelConfig, params, obs, task, key, eval_mode: bool = True):
    """mpc=false: the policy prior's tanh(mean) in eval mode, a sample otherwise. obs (O,)."""
    cfg1, p1 = networks.condition_on_task(cfg, params, task)
    mask = _mask(cfg, task)
    z = networks.encode(cfg1, p1, obs[None], None)
    a, _, mean = networks.pi_sample(cfg1, p1, z, None, mask, key)
    return (mean if eval_mode else a)[0]


def act(cfg, pcfg, params, obs, task, state, t0, key, eval_mode=True):
    """MPPI if pcfg.mpc else the policy prior; same signature either way."""
    if pcfg.mpc:
        return plan(cfg, pcfg, params, obs, task, state, t0, key, eval_mode)
    return policy_act(cfg, params, obs, task, key, eval_mode), state


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def act_batch(cfg, pcfg, params, obs, task, state, t0, key, eval_mode=True):
    """`act` vmapped over independent problems: obs (B, O), task (B,), state (B, H, A), t0 (B,)."""
    keys = jax.random.split(key, obs.shape[0])
    fn = lambda o, t, s, f, k: act(cfg, pcfg, params, o, t, s, f, k, eval_mode)
    if not pcfg.mpc:
        return jax.vmap(fn)(obs, task, state, t0, keys)
    # all problems at once would stream (B x samples x width) activations through memory
    return jax.lax.map(lambda a: fn(*a), (obs, task, state, t0, keys), batch_size=min(pcfg.chunk, obs.shape[0]))


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def act_one(cfg, pcfg, params, obs, task, state, t0, key, eval_mode=True):
    """`act` for a single problem, jitted."""
    return act(cfg, pcfg, params, obs, task, state, t0, key, eval_mode)
