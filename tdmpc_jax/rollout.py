"""Acting in environments: actors, and `rollout`, the one lock-step episode loop.

An actor (in the style of brax's `make_inference_fn` policies) is a function

    actor(params, obs (n, O), task (n,) int, state, t0 (n,) bool, key) -> (actions (n, A), state)

over n independent problems (padded obs and actions, as `BatchedEnv` gives and takes); `state` is
whatever the actor carries between steps (the planner's warm start). Actors:
* `make_actor(cfg, pcfg, eval_mode)`: the JAX planner (MPPI, or the policy prior when not pcfg.mpc);
* `host_actor(fn)`: a function (obs, task, t0) -> actions that keeps its own state, e.g. an exported
  agent (`tdmpc_jax_runtime.OnnxAgent.act_batch`);
* any other function of that signature (online training's random seeding actions, a renderer's).

`rollout(env, actor, params, task, length, keys, ...)` plays the lock-step loop over a `BatchedEnv`
and returns each slot's return; callers attach their own per-step hook `on_step(t, obs, actions,
rewards, next_obs, dones)` (evaluation: actions, progress; collection and online training: the
transitions; rendering: frames). The key of step t is `keys(t)`: callers keep their own key schedule.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import networks, planner
from tdmpc_jax.config import ModelConfig
from tdmpc_jax.envs import BatchedEnv
from tdmpc_jax.planner import PlannerConfig

Actor = Callable[..., tuple]  # (params, obs, task, state, t0, key) -> (actions, state)
OnStep = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def make_actor(cfg: ModelConfig, pcfg: PlannerConfig, eval_mode: bool = True, batched: bool = True,
               devices=None) -> Actor:
    """The JAX planner as an actor (`planner.act_batch`: the step's key is split over the n problems).

    The batched actor also has `actor.act_keys(params, obs, task, state, t0, keys (n, 2))`: the same with
    one key per problem, for any subset of the batch (`rollout(..., parts=2)` plans one half while the
    other half's environments step). devices: more than one device splits the problems over them
    (`planner.act_sharded`); each problem's result is the one-device result.
    batched=False: one problem (n == 1) acted by `planner.act_one` with the step's key as is and an
    unbatched state (H, A), as a single-environment loop acts (rendering)."""
    if batched:
        devs = tuple(devices) if devices is not None and len(devices) > 1 else None

        copies = {}  # the last params object and its per-device copies: transferred once, not per step

        def act_keys(params, obs, task, state, t0, keys):
            if not devs:
                return planner.act_keys(cfg, pcfg, params, jnp.asarray(obs), jnp.asarray(task), state,
                                        jnp.asarray(t0), keys, eval_mode)
            if copies.get("params") is not params:
                copies.update(params=params, per_device=planner.replicate(params, devs))
            return planner.act_sharded(cfg, pcfg, params, jnp.asarray(obs), jnp.asarray(task), state,
                                       jnp.asarray(t0), keys, eval_mode, devices=devs,
                                       device_params=copies["per_device"])

        def actor(params, obs, task, state, t0, key):
            if devs:
                return act_keys(params, obs, task, state, t0, jax.random.split(key, len(obs)))
            return planner.act_batch(cfg, pcfg, params, jnp.asarray(obs), jnp.asarray(task), state,
                                     jnp.asarray(t0), key, eval_mode)
        actor.act_keys = act_keys
        actor.align = planner.group_align(pcfg)
    else:
        def actor(params, obs, task, state, t0, key):
            if len(obs) != 1:
                raise ValueError(f"an unbatched actor acts for one problem, got {len(obs)}")
            a, state = planner.act_one(cfg, pcfg, params, jnp.asarray(obs[0]), jnp.asarray(task[0]), state,
                                       jnp.asarray(t0[0]), key, eval_mode)
            return a[None], state
    return actor


def rows_actor(actor: Actor, rows, n: int) -> Actor:
    """`actor` (from `make_actor`) for problems `rows` of an n-problem batch played apart: problem j acts
    with row rows[j] of `jax.random.split(key, n)`, the key it has in the whole batch. Contiguous rows
    starting at a multiple of `actor.align` (and a multiple of it long, or ending at n) form the whole
    batch's vmapped chunks: they play the whole batch's actions bit for bit (`evaluation.evaluate`'s
    resumable groups)."""
    act_keys = getattr(actor, "act_keys", None)
    if act_keys is None:
        raise ValueError("rows_actor needs an actor with per-problem keys (`make_actor`)")
    rows = jnp.asarray(np.asarray(rows, np.int64))

    def problem_keys(key, m):
        if m != rows.shape[0]:
            raise ValueError(f"rows_actor plays {rows.shape[0]} problems, got {m}")
        return jax.random.split(key, n)[rows]

    def sub(params, obs, task, state, t0, key):
        return act_keys(params, obs, task, state, t0, problem_keys(key, len(obs)))
    sub.act_keys = act_keys
    sub.align = getattr(actor, "align", 1)
    sub.problem_keys = problem_keys
    return sub


RANDOM_ACTION_KEY = 0xDA27  # folded into the step's key for `with_random_actions`' draws


def with_random_actions(actor: Actor, cfg: ModelConfig, probs) -> Actor:
    """`actor` whose problem i plays, at each step and with probability probs[i], a uniform random action on
    its task's action dims instead of the actor's (noise injection, as DART: the data then hold the states
    a perturbed agent visits, and the recoveries from them). The executed action is what the step returns
    (and what a dataset stores). Draws: `fold_in(step key, RANDOM_ACTION_KEY)`; probability 0 returns the
    actor's actions unchanged."""
    probs = jnp.asarray(probs, jnp.float32)

    def noisy(params, obs, task, state, t0, key):
        a, state = actor(params, obs, task, state, t0, key)
        k_act, k_swap = jax.random.split(jax.random.fold_in(key, RANDOM_ACTION_KEY))
        mask = networks.task_action_mask(cfg, jnp.asarray(task))
        rand = jax.random.uniform(k_act, a.shape, minval=-1.0, maxval=1.0) * mask
        swap = jax.random.uniform(k_swap, (a.shape[0], 1)) < probs[:, None]
        return jnp.where(swap, rand, a), state
    return noisy


def host_actor(fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> Actor:
    """fn(obs (n, O) float32, task (n,), t0 (n,) bool) -> actions (n, A), keeping its own state (and
    randomness), as an actor: params, state and key pass through unused."""
    def actor(params, obs, task, state, t0, key):
        return fn(np.asarray(obs, np.float32), np.asarray(task), np.asarray(t0)), state
    return actor


def fold_in_keys(seed: int) -> Callable[[int], Any]:
    """The evaluator's key schedule: step t acts with fold_in(PRNGKey(seed), t)."""
    key = jax.random.PRNGKey(seed)
    return lambda t: jax.random.fold_in(key, t)


def rollout(env: BatchedEnv, actor: Actor, params, task, length: int, keys: Callable[[int], Any], *,
            state=None, on_step: Optional[OnStep] = None, obs: Optional[np.ndarray] = None,
            until_done: bool = True, timing: Optional[dict] = None, parts: int = 1) -> np.ndarray:
    """Reset `env` (unless its reset observations `obs` are given) and play up to `length` lock-step
    steps -> each slot's return (n,) float64.

    params: the actor's parameters, or a function returning them at each step (online training updates
    them between steps). task: task ids (n,). keys(t): the actor's key at step t. state: the actor's
    initial state. on_step(t, obs, actions, rewards, next_obs, dones) sees every transition, after the
    step. until_done: stop once every slot's episode has ended (False: play all `length` steps).
    timing: a dict that receives where the wall time went, in seconds: "act_first_s" (step 0's actor
    call: compilation included), "act_s" (the other steps' actor calls until the actions are on the host:
    planning and transfer), "env_s" (stepping the environments), "hook_s" (on_step), "steps".
    parts > 1: the overlapped loop (`_rollout_parts`): the slots are split into `parts` groups and
    while one group's environments step, the actor plans for the next group (JAX dispatch is
    asynchronous); the same transitions and returns as parts=1 for an actor with `act_keys`, whose
    problem i always acts with row i of `jax.random.split(keys(t), n)` (groups are aligned to the
    planner's chunk, `actor.align`; on an accelerator, which plans all problems in one chunk, the
    groups' actions may differ from the whole batch's by float32 rounding). params must not be a function.
    """
    if parts > 1:
        return _rollout_parts(env, actor, params, task, length, keys, state, on_step, obs, until_done, timing,
                              parts)
    clock = time.perf_counter
    tm = {"act_first_s": 0.0, "act_s": 0.0, "env_s": 0.0, "hook_s": 0.0, "steps": 0}
    if obs is None:
        obs = env.reset()
    n = len(obs)
    returns = np.zeros(n, np.float64)
    for t in range(length):
        c0 = clock()
        p = params() if callable(params) else params
        act, state = actor(p, obs, task, state, jnp.full((n,), t == 0), keys(t))
        act = np.asarray(act)
        c1 = clock()
        tm["act_first_s" if t == 0 else "act_s"] += c1 - c0
        _check_finite(act, t)
        next_obs, rew, done = env.step(act)
        tm["env_s"] += clock() - c1
        _, stop = _end_step(on_step, tm, clock, returns, until_done, t, obs, act, rew, next_obs, done)
        obs = next_obs
        if stop:
            break
    return _report(timing, tm, returns)


def _end_step(on_step, tm, clock, returns, until_done, *transition):
    """After a step (t, obs, actions, rewards, next_obs, dones): add the rewards to `returns`, call
    on_step, count the step and the hook's time -> (the clock after, whether the loop stops)."""
    returns += transition[3]
    c = clock()
    if on_step is not None:
        on_step(*transition)
    end = clock()
    tm["hook_s"] += end - c
    tm["steps"] += 1
    return end, until_done and bool(transition[5].all())


def _report(timing, tm, returns):
    if timing is not None:
        timing.update(tm)
    return returns


def _check_finite(act, t):
    if not np.all(np.isfinite(act)):
        raise FloatingPointError(f"the actor produced non-finite actions at step {t}")


def _rollout_parts(env, actor, params, task, length, keys, state, on_step, obs, until_done, timing, parts):
    """The overlapped lock-step loop: per step, for each group g in turn: wait for g's actions (planned
    while the previous group's environments stepped), step g's environments, dispatch g's next plan.
    The device plans group g+1 while the host steps group g. timing: "act_s" is the time spent waiting
    for actions (planning not hidden behind stepping), "env_s" stepping, as in `rollout`."""
    act_keys = getattr(actor, "act_keys", None)
    if act_keys is None:
        raise ValueError("rollout(parts > 1) needs an actor with per-problem keys (`make_actor`)")
    if callable(params):
        raise ValueError("rollout(parts > 1) plans ahead: params must be fixed, not a function")
    clock = time.perf_counter
    tm = {"act_first_s": 0.0, "act_s": 0.0, "env_s": 0.0, "hook_s": 0.0, "steps": 0}
    if obs is None:
        obs = env.reset()
    n = len(obs)
    groups = planner.split_problems(n, parts, getattr(actor, "align", 1))
    task = jnp.asarray(task)
    states = [jax.tree_util.tree_map(lambda x: x[g], state) for g in groups]
    returns = np.zeros(n, np.float64)

    def dispatch(i, t, o, step_keys):
        g = groups[i]
        a, states[i] = act_keys(params, o, task[g], states[i], jnp.full((len(g),), t == 0), step_keys[g])
        return a

    split = getattr(actor, "problem_keys", jax.random.split)  # (key, n) -> each problem's key (`rows_actor`)
    step_keys = split(keys(0), n)
    c0 = clock()
    pending = [dispatch(i, 0, obs[g], step_keys) for i, g in enumerate(groups)]
    for t in range(length):
        act = np.zeros((n, env.action_dim), np.float32)
        next_obs = np.zeros_like(obs)
        rew, done = np.zeros(n, np.float32), np.zeros(n, bool)
        next_keys = split(keys(t + 1), n) if t + 1 < length else None
        for i, g in enumerate(groups):
            a = np.asarray(pending[i])
            c1 = clock()
            tm["act_first_s" if t == 0 else "act_s"] += c1 - c0
            _check_finite(a, t)
            act[g] = a
            env.step_async(a, g)
            next_obs[g], rew[g], done[g] = env.step_wait()
            c0 = clock()
            tm["env_s"] += c0 - c1
            if next_keys is not None:
                pending[i] = dispatch(i, t + 1, next_obs[g], next_keys)
        c0, stop = _end_step(on_step, tm, clock, returns, until_done, t, obs, act, rew, next_obs, done)
        obs = next_obs
        if stop:
            break
    return _report(timing, tm, returns)
