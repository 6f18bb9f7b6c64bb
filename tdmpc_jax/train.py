"""Train state and the TD-MPC2 update: one jitted step, data-parallel over a device mesh.

`make_train_step(cfg, tcfg, teacher_cfg, mesh)` returns step(state, batch, teacher_params) -> (state,
metrics); `make_train_steps(..., block=K)` runs K updates per jitted call (a lax.scan over K stacked
batches; for accelerators).

Task embedding (official nn.Embedding(max_norm=1)): PyTorch renormalises the looked-up rows IN the
stored weight before each lookup, so the optimiser steps from the rescaled rows and the gradient is
that of a plain row. The update does the same, at the two points where the official update looks
them up: before the TD-target/world-model pass and before the policy pass (after the Adam step).
With `policy_emb_leak` the policy loss's embedding gradient is kept in the state and added to the
next step's world-model gradient (before clipping), as the official 'new' code does. With a mesh of several devices the batch is sharded along its batch axis and params are
replicated; XLA all-reduces the gradients, so the result equals one device on the same global batch.
Multi-host: call `init_distributed(...)` first; the mesh then spans every process's devices.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tdmpc_jax import host_memory, networks
from tdmpc_jax.config import ModelConfig, TrainConfig
from tdmpc_jax.losses import Batch, make_losses


class TrainState(NamedTuple):
    params: Any          # world model incl. pi_head
    target_qs: Any
    wm_opt: Any          # optimizer state of everything but pi_head
    pi_opt: Any          # optimizer state of pi_head
    scale: jax.Array     # RunningScale value
    step: jax.Array
    emb_leak: Any = None  # policy_emb_leak: the last policy loss's task-embedding gradient (zeros otherwise)
    # offline weight averaging (`offline.RunConfig.average_from`): the sum of the {params, target_qs}
    # snapshots taken so far; kept by the training loop for its checkpoints, never passed to the update
    average: Any = None


def weights(state: TrainState) -> dict:
    """What weight averaging averages (the layout of `TrainState.average`): everything the planner and
    the policy prior use."""
    return {"params": state.params, "target_qs": state.target_qs}


def split_pi(params):
    return {k: v for k, v in params.items() if k != "pi_head"}, params["pi_head"]


def make_optimizers(tcfg: TrainConfig):
    """Main Adam (encoder lr x enc_lr_scale) and pi Adam (eps 1e-5), each after global-norm clip 20."""
    labels = lambda tree: {k: jax.tree_util.tree_map(lambda _: "enc" if k == "encoder" else "other", v)
                           for k, v in tree.items()}
    wm = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip_norm),
                     optax.multi_transform({"enc": optax.adam(tcfg.lr * tcfg.enc_lr_scale),
                                            "other": optax.adam(tcfg.lr)}, labels))
    pi = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip_norm), optax.adam(tcfg.lr, eps=tcfg.pi_adam_eps))
    return wm, pi


def init_train_state(cfg: ModelConfig, tcfg: TrainConfig, key=None, params=None, target_qs=None) -> TrainState:
    if params is None:
        params, target_qs = networks.init_params(cfg, key)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    target_qs = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), target_qs)
    wm, pi = make_optimizers(tcfg)
    rest, pi_params = split_pi(params)
    leak = jnp.zeros_like(params["task_emb"]["embedding"]) if cfg.multitask else jnp.zeros(())
    return TrainState(params, target_qs, wm.init(rest), pi.init(pi_params), jnp.float32(1.0), jnp.int32(0), leak)


def make_update(cfg: ModelConfig, tcfg: TrainConfig, teacher_cfg: Optional[ModelConfig] = None,
                fused: bool = True):
    """The pure update: (state, batch, key, teacher_params) -> (state, metrics).

    fused=False runs the plain computation (`losses.make_losses`); the tests pin both to each other."""
    losses = make_losses(cfg, tcfg, teacher_cfg, fused)
    wm_opt, pi_opt = make_optimizers(tcfg)

    leak = tcfg.policy_emb_leak and cfg.multitask

    def update(state: TrainState, batch: Batch, key, teacher_params=None):
        k_wm, k_pi = jax.random.split(key)
        params = networks.write_back_max_norm(cfg, state.params, batch.task)  # TD-target / model lookups
        rest, pi_params = split_pi(params)

        def wm_loss(rest):
            return losses.world_model(dict(rest, pi_head=pi_params), state.target_qs, batch, k_wm, teacher_params)
        (loss, (metrics, zs, pi_targets)), grads = jax.value_and_grad(wm_loss, has_aux=True)(rest)
        if leak:  # torch accumulates the previous policy backward's embedding grad into this one
            grads = dict(grads, task_emb={"embedding": grads["task_emb"]["embedding"] + state.emb_leak})
        metrics["grad_norm"] = optax.global_norm(grads)
        upd, wm_state = wm_opt.update(grads, state.wm_opt, rest)
        rest = optax.apply_updates(rest, upd)
        params = networks.write_back_max_norm(cfg, dict(rest, pi_head=pi_params), batch.task)  # policy lookup
        trainable = {"pi_head": pi_params, "task_emb": params["task_emb"]} if leak else {"pi_head": pi_params}
        (pi_loss, (pi_metrics, scale)), pi_grads = jax.value_and_grad(losses.policy, has_aux=True)(
            trainable, params, zs, batch.task, state.scale, k_pi, pi_targets)
        pi_upd, pi_state = pi_opt.update(pi_grads["pi_head"], state.pi_opt, pi_params)
        params = dict(params, pi_head=optax.apply_updates(pi_params, pi_upd))
        target = jax.tree_util.tree_map(lambda t, o: (1 - tcfg.tau) * t + tcfg.tau * o, state.target_qs, params["qs"])
        metrics.update(pi_metrics)
        emb_leak = pi_grads["task_emb"]["embedding"] if leak else state.emb_leak
        return TrainState(params, target, wm_state, pi_state, scale, state.step + 1, emb_leak), metrics

    return update


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh, block: bool = False) -> Batch:
    """obs/action/reward shard their batch axis (1), task its only axis; `block`: a leading axis of
    stacked batches (make_train_steps) comes first, unsharded."""
    lead = (None,) if block else ()
    return Batch(NamedSharding(mesh, P(*lead, None, "data")), NamedSharding(mesh, P(*lead, None, "data")),
                 NamedSharding(mesh, P(*lead, None, "data")), NamedSharding(mesh, P(*lead, "data")))


def _step_mesh(tcfg: TrainConfig, mesh: Optional[Mesh]) -> Mesh:
    """The mesh a step runs on (default: all devices), checked against the batch; tunes host memory."""
    host_memory.keep_freed_memory()
    mesh = mesh or make_mesh()
    n = mesh.devices.size
    if tcfg.batch_size % n:
        raise ValueError(f"batch size {tcfg.batch_size} is not divisible by the {n} devices")
    return mesh


def make_train_step(cfg: ModelConfig, tcfg: TrainConfig, teacher_cfg: Optional[ModelConfig] = None,
                    mesh: Optional[Mesh] = None):
    """Jitted data-parallel step(state, batch, key, teacher_params) over `mesh` (default: all devices).

    Also keeps large freed host blocks for reuse (`host_memory.keep_freed_memory`: the update's
    temporaries no longer page-fault in on every call)."""
    mesh = _step_mesh(tcfg, mesh)
    step = _jitted_update(cfg, tcfg, teacher_cfg, mesh)

    rep = NamedSharding(mesh, P())
    shard = batch_sharding(mesh)

    def run(state, batch, key, teacher_params=None):
        """batch: the GLOBAL batch (every process passes the same one; each keeps its own shards)."""
        batch = Batch(*(_to_global(x, s) for x, s in zip(batch, shard)))
        state, key, teacher_params = (_globalize(t, rep) for t in (state, key, teacher_params))
        return step(state, batch, key, teacher_params)
    run.mesh = mesh
    return run


def make_update_block(cfg: ModelConfig, tcfg: TrainConfig, teacher_cfg: Optional[ModelConfig] = None,
                      fused: bool = True):
    """K updates as one pure function (purejaxrl style): (state, batches, keys, teacher_params) ->
    (state, metrics) with `batches` a Batch whose leaves have a leading axis of K pre-sampled batches,
    `keys` (K, 2) and every metric stacked to (K,). A `lax.scan` of `make_update`: the same
    computation, one dispatch (and one host round trip) per K updates."""
    update = make_update(cfg, tcfg, teacher_cfg, fused)

    def block(state: TrainState, batches: Batch, keys, teacher_params=None):
        return jax.lax.scan(lambda s, bk: update(s, bk[0], bk[1], teacher_params), state, (batches, keys))

    return block


def make_train_steps(cfg: ModelConfig, tcfg: TrainConfig, teacher_cfg: Optional[ModelConfig] = None,
                     mesh: Optional[Mesh] = None, block: int = 1):
    """`make_train_step` for blocks of `block` updates per jitted call (for accelerators, where the
    per-call dispatch and host sync dominate small updates).

    steps(state, batches, keys, teacher_params) -> (state, metrics): batches is a Batch of K = `block`
    stacked GLOBAL batches (obs (K, H+1, B, O), action (K, H, B, A), reward (K, H, B), task (K, B)),
    keys (K, 2) the K update keys; metrics come back stacked (K,). Equals K calls of make_train_step
    with the same batches and keys (tested)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    mesh = _step_mesh(tcfg, mesh)
    steps = _jitted_block(cfg, tcfg, teacher_cfg, mesh)
    rep = NamedSharding(mesh, P())
    shard = batch_sharding(mesh, block=True)

    def run(state, batches, keys, teacher_params=None):
        lead = {np.shape(x)[0] for x in batches} | {np.shape(keys)[0]}
        if lead != {block}:
            raise ValueError(f"expected {block} stacked batches and keys, got leading sizes {sorted(lead)}")
        batches = Batch(*(_to_global(x, s) for x, s in zip(batches, shard)))
        state, keys, teacher_params = (_globalize(t, rep) for t in (state, keys, teacher_params))
        return steps(state, batches, keys, teacher_params)
    run.mesh = mesh
    run.block = block
    return run


def _to_global(x, sharding):
    """A host array (the same on every process) -> a jax.Array laid out by `sharding` over the mesh."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _globalize(tree, sharding):
    return None if tree is None else jax.tree_util.tree_map(lambda x: _to_global(x, sharding), tree)


@functools.lru_cache(maxsize=16)
def _jitted_update(cfg, tcfg, teacher_cfg, mesh):
    """One compiled step per (configs, mesh) in a process (runs and resumes reuse it)."""
    rep = NamedSharding(mesh, P())
    return jax.jit(make_update(cfg, tcfg, teacher_cfg), in_shardings=(rep, batch_sharding(mesh), rep, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def _jitted_block(cfg, tcfg, teacher_cfg, mesh):
    rep = NamedSharding(mesh, P())
    return jax.jit(make_update_block(cfg, tcfg, teacher_cfg), in_shardings=(rep, batch_sharding(mesh, True), rep, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,))


def init_distributed(coordinator_address: str, num_processes: int, process_id: int):
    """Multi-host / multi-process training: afterwards jax.devices() spans every process."""
    if num_processes > 1:
        if jax.default_backend() == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
