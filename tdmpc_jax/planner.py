"""MPPI planning and policy-prior acting as pure, jit-able functions with explicit state and keys.

`plan` follows the official TD-MPC2 `_plan` (reference doc §4): policy trajectories, warm start from
the previous mean, elite refit with temperature, multi-task masks, elite sampling for the final action
and exploration noise outside eval mode. Deliberate differences (documented in the README):
* the task embedding is folded into first-layer biases once per call (`networks.condition_on_task`);
* the 24 policy trajectories are valued once per call (their terminal policy action is drawn once,
  not once per iteration), since their actions do not change across iterations.
`plan_batch` vmaps it over independent problems (tasks, episodes).
`plan` draws every random number up front (`draw_noise`) and calls `plan_with_noise`, a deterministic
function of (obs, task, previous mean, t0, noise): the one implementation, also the one exported to ONNX.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import scalar_math as tmath
from tdmpc_jax import networks
from tdmpc_jax.config import ModelConfig


CPU_CHUNK = 4  # the CPU default measured on main (issue 13's table); accelerators take every problem at once


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
    chunk: int = 0       # MPPI problems vmapped together in act_batch; 0 = per backend (`chunk_for`)

    def __post_init__(self):
        if self.horizon < 1 or self.iterations < 1 or self.num_elites < 1:
            raise ValueError("horizon, iterations and num_elites must be >= 1")
        if not 0 <= self.num_pi_trajs < self.num_samples:
            raise ValueError(f"num_pi_trajs ({self.num_pi_trajs}) must be in [0, num_samples={self.num_samples})")
        if self.num_elites > self.num_samples:
            raise ValueError(f"num_elites ({self.num_elites}) exceeds num_samples ({self.num_samples})")
        if not self.min_std <= self.max_std:
            raise ValueError("min_std must be <= max_std")
        if self.chunk < 0:
            raise ValueError("chunk must be >= 1, or 0 for the backend's default")

    @classmethod
    def scaled(cls, iterations: int, num_samples: int, **kwargs) -> "PlannerConfig":
        """A planner with `num_samples` samples whose elites and policy trajectories keep the official
        proportions (64 and 24 of 512: one eighth and one sixteenth, at most the official counts)."""
        return cls(iterations=iterations, num_samples=num_samples, num_elites=min(64, num_samples // 8),
                   num_pi_trajs=min(24, num_samples // 16), **kwargs)

    def chunk_for(self, problems: int, backend: str) -> int:
        """Problems per vmapped chunk: `chunk` if set, else CPU_CHUNK on a CPU (the samples x width
        activations of a few problems stay in cache) and every problem at once on an accelerator (one
        launch per step instead of problems / 4: 2.7x more actions/s on an H100 at 300 problems). Not
        clamped to `problems`: fewer problems than a chunk are vmapped as lax.map vmaps a ragged last
        chunk, so a subset of a batch planned apart runs the whole batch's program (same actions)."""
        if self.chunk:
            return self.chunk
        return CPU_CHUNK if backend == "cpu" else problems

    def iterations_for(self, action_dim: int) -> int:
        return self.iterations + (2 if action_dim >= 20 else 0)


class PlanState(NamedTuple):
    prev_mean: jax.Array  # (H, A)


def init_state(cfg: ModelConfig, pcfg: PlannerConfig, batch: int | None = None) -> PlanState:
    shape = (pcfg.horizon, cfg.action_dim) if batch is None else (batch, pcfg.horizon, cfg.action_dim)
    return PlanState(jnp.zeros(shape, jnp.float32))


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


# --- randomness: every draw of one MPPI action, made up front from its key ------------------------

class PlanNoise(NamedTuple):
    """The random numbers one MPPI action consumes (H horizon, P policy trajectories, N samples,
    I iterations, E elites, A action dims). `draw_noise` draws them from a key exactly as `plan`
    always did; `plan_with_noise` takes them as arrays (an exported planner takes them as inputs)."""
    pi_eps: jax.Array      # (H, P, A) standard normals of the policy trajectories' actions
    pi_val_eps: jax.Array  # (P, A) terminal policy-action noise when valuing the policy trajectories
    pi_val_q: jax.Array    # (2,) int32: the Q pair of that valuation (unused when num_q <= 2)
    eps: jax.Array         # (I, H, N - P, A) standard normals of the sampled action sequences
    val_eps: jax.Array     # (I, N - P, A) terminal policy-action noise of each iteration's valuation
    val_q: jax.Array       # (I, 2) int32: each iteration's Q pair
    gumbel: jax.Array      # (E,) Gumbel noise of the final elite choice (jax.random.categorical's)
    explore: jax.Array     # (A,) standard normals of the exploration noise (outside eval mode)


def _value_noise(cfg, key, n):
    """The draws a valuation of n sequences makes from its key: (policy noise (n, A), Q pair (2,))."""
    k_pi, k_q = jax.random.split(key)
    return jax.random.normal(k_pi, (n, cfg.action_dim), jnp.float32), networks.q_pair(cfg, k_q)


def _pi_from_eps(cfg, params, z, emb, mask, eps):
    """`networks.pi_sample`'s action for given standard normals eps (B, A)."""
    mean, log_std = networks.pi_dist(cfg, params, z, emb, mask)
    return jnp.tanh(mean + (eps * mask) * jnp.exp(log_std))


def draw_noise(cfg: ModelConfig, pcfg: PlannerConfig, key) -> PlanNoise:
    """Every random number of one `plan` call, from its key (the same splits and draws as before)."""
    H, A, N, P = pcfg.horizon, cfg.action_dim, pcfg.num_samples, pcfg.num_pi_trajs
    k_pi, k_pival, key = jax.random.split(key, 3)
    pi_eps = jnp.stack([jax.random.normal(k, (P, A), jnp.float32) for k in jax.random.split(k_pi, H)])
    pi_val_eps, pi_val_q = _value_noise(cfg, k_pival, P)
    k_iter, k_choice, k_noise = jax.random.split(key, 3)

    def per_iteration(k):
        k_s, k_v = jax.random.split(k)
        return (jax.random.normal(k_s, (H, N - P, A), jnp.float32),) + _value_noise(cfg, k_v, N - P)

    eps, val_eps, val_q = jax.vmap(per_iteration)(jax.random.split(k_iter, pcfg.iterations_for(A)))
    return PlanNoise(pi_eps, pi_val_eps, pi_val_q, eps, val_eps, val_q,
                     jax.random.gumbel(k_choice, (pcfg.num_elites,), jnp.float32),
                     jax.random.normal(k_noise, (A,), jnp.float32))


def estimate_value_lean(cfg1, pp, z0, actions, mask, gamma, key=None, *, pi_eps=None, q_idx=None):
    """Same value as `estimate_value` for N sequences starting from ONE latent z0 (1, L).

    Step 0 shares z0 across all sequences, so its first layer is z0 @ W_z (once) + a @ W_a.
    The terminal policy noise pi_eps (N, A) and Q pair q_idx (2,) are drawn from `key` unless given.
    """
    if pi_eps is None:
        pi_eps, q_idx = _value_noise(cfg1, key, actions.shape[1])
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
    a = _pi_from_eps(cfg1, pp, z, None, mask, pi_eps)
    _, qs = networks.take_qs(cfg1, pp["qs"], q_idx)
    return jnp.nan_to_num(G + disc * _q_avg(cfg1, qs, z, a), nan=0.0)


def plan(cfg: ModelConfig, pcfg: PlannerConfig, params, obs, task, state: PlanState, t0, key,
         eval_mode: bool = True):
    """One MPPI action for one problem: obs (O,), task () int, t0 () bool -> (action (A,), state)."""
    a, mean = plan_with_noise(cfg, pcfg, params, obs, task, state.prev_mean, t0, draw_noise(cfg, pcfg, key),
                              eval_mode)
    return a, PlanState(mean)


def plan_with_noise(cfg: ModelConfig, pcfg: PlannerConfig, params, obs, task, prev_mean, t0, noise: PlanNoise,
                    eval_mode: bool = True):
    """`plan` with every random number given (a deterministic function; `plan` calls it after `draw_noise`).

    obs (O,), task () int, prev_mean (H, A) (the previous call's mean), t0 () bool -> (action (A,), mean (H, A)).
    """
    if pcfg.plain:
        cfg1, pp = cfg, params
        emb = networks.embed(cfg, params, jnp.reshape(task, (1,)))
        z0 = networks.encode(cfg, params, obs[None], emb)

        def value(z_first, actions, eps, q_idx):
            n = actions.shape[1]
            e = None if emb is None else jnp.repeat(emb, n, 0)
            return estimate_value(cfg, params, jnp.repeat(z_first, n, 0), actions, mask, gamma, None, e,
                                  pi_eps=eps, q_idx=q_idx)

        def rollout_pi(z, eps):
            e = None if emb is None else jnp.repeat(emb, z.shape[0], 0)
            a = _pi_from_eps(cfg, params, z, e, mask, eps)
            return a, (lambda a_: networks.next_latent(cfg, params, z, a_, e))
    else:
        cfg1, pp = prepare(cfg, params, task)
        z0 = networks.encode(cfg1, pp, obs[None], None)  # (1, L)

        def value(z_first, actions, eps, q_idx):
            return estimate_value_lean(cfg1, pp, z_first, actions, mask, gamma, pi_eps=eps, q_idx=q_idx)

        def rollout_pi(z, eps):
            a = _pi_from_eps(cfg1, pp, z, None, mask, eps)
            return a, (lambda a_: networks.next_latent(cfg1, pp, z, a_, None))
    mask = networks.task_action_mask(cfg, task)
    gamma = networks.discounts(cfg)[task] if cfg.multitask else networks.discounts(cfg)[0]
    H, A, N, P = pcfg.horizon, cfg.action_dim, pcfg.num_samples, pcfg.num_pi_trajs

    # policy trajectories: their actions do not change across iterations, so value them once
    if P > 0:
        z = jnp.repeat(z0, P, axis=0)
        pi_actions = []
        for t in range(H):
            a, step = rollout_pi(z, noise.pi_eps[t])
            pi_actions.append(a)
            if t < H - 1:
                z = step(a)
        pi_actions = jnp.stack(pi_actions) * mask  # (H, P, A)
        pi_value = value(z0, pi_actions, noise.pi_val_eps, noise.pi_val_q)
    mean = jnp.where(t0, jnp.zeros((H, A), jnp.float32),
                     jnp.concatenate([prev_mean[1:], jnp.zeros((1, A), jnp.float32)]))
    std = jnp.full((H, A), pcfg.max_std, jnp.float32)

    def iteration(carry, draws):
        mean, std, _, _ = carry
        eps, val_eps, val_q = draws
        sampled = jnp.clip(mean[:, None] + std[:, None] * eps, -1.0, 1.0) * mask
        val = value(z0, sampled, val_eps, val_q)
        if P > 0:
            actions = jnp.concatenate([pi_actions, sampled], axis=1)
            pv = value(z0, pi_actions, noise.pi_val_eps, noise.pi_val_q) if pcfg.plain else pi_value
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

    init = (mean, std, jnp.zeros((H, pcfg.num_elites, A)), jnp.zeros((pcfg.num_elites,)))
    (mean, std, elites, score), _ = jax.lax.scan(iteration, init, (noise.eps, noise.val_eps, noise.val_q))
    idx = jnp.argmax(noise.gumbel + jnp.log(score))  # jax.random.categorical(k, log(score)) with its Gumbel draw
    a = elites[0, idx]
    if not eval_mode:
        a = a + std[0] * noise.explore
    return jnp.clip(a, -1.0, 1.0), mean


def estimate_value(cfg, params, z, actions, mask, gamma, key=None, emb=None, *, pi_eps=None, q_idx=None):
    """Plain value of N sequences: H-step model return + gamma^H * Q_avg(z_H, pi(z_H)).

    z (N, L), actions (H, N, A), emb (N, T) or None: the official computation. The terminal policy
    noise pi_eps (N, A) and Q pair q_idx (2,) are drawn from `key` unless given.
    """
    if pi_eps is None:
        pi_eps, q_idx = _value_noise(cfg, key, actions.shape[1])
    G, disc = 0.0, 1.0
    for t in range(actions.shape[0]):
        G = G + disc * networks.reward(cfg, params, z, actions[t], emb)
        z = networks.next_latent(cfg, params, z, actions[t], emb)
        disc = disc * gamma
    a = _pi_from_eps(cfg, params, z, emb, mask, pi_eps)
    qcfg, qs = networks.take_qs(cfg, params["qs"], q_idx)
    q = networks.q_values(qcfg, qs, z, a, emb).mean(0)
    return jnp.nan_to_num(G + disc * q, nan=0.0)


def policy_act(cfg: ModelConfig, params, obs, task, key, eval_mode: bool = True):
    """mpc=false: the policy prior's tanh(mean) in eval mode, a sample otherwise. obs (O,)."""
    cfg1, p1 = networks.condition_on_task(cfg, params, task)
    mask = networks.task_action_mask(cfg, task)
    z = networks.encode(cfg1, p1, obs[None], None)
    a, _, mean = networks.pi_sample(cfg1, p1, z, None, mask, key)
    return (mean if eval_mode else a)[0]


def act(cfg, pcfg, params, obs, task, state, t0, key, eval_mode=True):
    """MPPI if pcfg.mpc else the policy prior; same signature either way."""
    if pcfg.mpc:
        return plan(cfg, pcfg, params, obs, task, state, t0, key, eval_mode)
    return policy_act(cfg, params, obs, task, key, eval_mode), state


def _act_problems(cfg, pcfg, params, obs, task, state, t0, keys, eval_mode):
    """`act` over independent problems, one key each: obs (B, O), task (B,), state (B, H, A), t0 (B,),
    keys (B, 2). A problem's result depends on its own inputs only (chunks are vmapped)."""
    fn = lambda o, t, s, f, k: act(cfg, pcfg, params, o, t, s, f, k, eval_mode)
    if not pcfg.mpc:
        return jax.vmap(fn)(obs, task, state, t0, keys)
    # all problems at once would stream (B x samples x width) activations through memory
    return jax.lax.map(lambda a: fn(*a), (obs, task, state, t0, keys),
                       batch_size=pcfg.chunk_for(obs.shape[0], jax.default_backend()))


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def act_batch(cfg, pcfg, params, obs, task, state, t0, key, eval_mode=True):
    """`act` vmapped over independent problems: obs (B, O), task (B,), state (B, H, A), t0 (B,); the
    step's key is split over the B problems (problem i acts with `jax.random.split(key, B)[i]`)."""
    return _act_problems(cfg, pcfg, params, obs, task, state, t0, jax.random.split(key, obs.shape[0]), eval_mode)


act_keys = jax.jit(_act_problems, static_argnums=(0, 1, 8))
act_keys.__doc__ = """`act` over problems with one key per problem (keys (B, 2)): any subset of a batch, acted with its
rows of `jax.random.split(key, B)`, gives those problems' `act_batch` results (the overlapped evaluator)."""


def split_problems(n: int, parts: int, align: int = 1):
    """Contiguous index groups of n problems, at most `parts`, near-equal, each a multiple of `align`
    problems except the last: a group then forms the same vmapped chunks as the whole batch does (the
    same float rounding: bit-identical actions)."""
    starts = [align * int(c[0]) for c in np.array_split(np.arange(-(-n // align)), parts) if len(c)]
    return [np.arange(a, b) for a, b in zip(starts, starts[1:] + [n])]


def group_align(pcfg: PlannerConfig) -> int:
    """The problems per chunk that `act_keys` forms on this backend whatever the batch size (1 where it
    vmaps all problems at once: groups then differ from the whole batch by float32 rounding only)."""
    return pcfg.chunk_for(1, jax.default_backend()) if pcfg.mpc else 1


def replicate(params, devices):
    """One copy of `params` per device (for `act_sharded`; transfer them once, not at every step)."""
    return tuple(jax.device_put(params, d) for d in devices)


def act_sharded(cfg, pcfg, params, obs, task, state, t0, keys, eval_mode=True, devices=None, device_params=None):
    """`act_keys` with the problems split into contiguous, near-equal groups (`split_problems`, aligned to
    the chunk), one per device (default: every local device), each group planned by the one-device program on its device (dispatch is
    asynchronous: the devices run at once). A problem's result is bit-identical to `act_keys` on one
    device for the same group shapes (the program is the same; a `shard_map` of it is not: XLA's SPMD
    compilation changes float rounding, ~1e-6 per action, which 500-step episodes amplify into different
    returns). params are copied to the devices at every call unless `device_params`
    (= `replicate(params, devices)`) is given. The results are gathered on the first device
    (asynchronously)."""
    devices = tuple(devices or jax.local_devices())
    if device_params is None:
        device_params = replicate(params, devices)
    groups = split_problems(obs.shape[0], len(devices), group_align(pcfg))
    outs = []
    for dev, p, g in zip(devices, device_params, groups):
        xs = jax.tree_util.tree_map(lambda x: x[g[0]:g[-1] + 1], (obs, task, state, t0, keys))
        outs.append(act_keys(cfg, pcfg, p, *jax.device_put(xs, dev), eval_mode))
    if len(outs) == 1:
        return outs[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate([jax.device_put(x, devices[0]) for x in xs]), *outs)


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def act_one(cfg, pcfg, params, obs, task, state, t0, key, eval_mode=True):
    """`act` for a single problem, jitted."""
    return act(cfg, pcfg, params, obs, task, state, t0, key, eval_mode)
