"""ONNX export of a world model: the policy prior and one full MPPI action, in fp32, fp16 and int8.

  policy  obs (B, O) [, task (B,)]                                    -> action (B, A)
  mppi    obs (O,) [, task ()], prev_mean (H, A), t0 (), noise...     -> action (A,), mean (H, A)

The graphs are written with `onnx.helper` from the param tree and mirror `planner.policy_act` (eval
mode: tanh of the mean) and the lean path of `planner.plan_with_noise` step for step, the MPPI loop
unrolled. Every random number is an input (`noise_shapes`: the fields of `planner.PlanNoise`), so a
graph is a deterministic function that equals its JAX counterpart given the same noise
(tests/export_test.py). A multi-task graph takes the task id and gathers the task's first-layer biases
(its embedding folded in, as `networks.condition_on_task` does), action mask and discount from per-task
tables; a single-task slice (`task=`) has them folded in as constants.

Precisions: fp32; fp16 (weights stored in fp16, cast to fp32 once when the session is created: half the
file, fp32 speed and numerics); int8 (onnxruntime quantization of every MatMul with a constant weight:
per-channel int8 weights, uint8 activations quantized per call ('dynamic') or with ranges calibrated on
real observations ('static', QDQ)).

Why not jax2onnx: every jax2onnx release that supports jax >= 0.8 (0.13 - 0.17.1) requires
orbax-checkpoint < 0.11.37, which cannot be installed next to this package's orbax-checkpoint==0.12.8, so
it cannot be an extra of this package; the ops needed here are few and all standard.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tdmpc_jax.config import ModelConfig

OPSET = 18        # LayerNormalization (17), ReduceMax with an axes input (18)
IR_VERSION = 10   # readable by onnxruntime >= 1.20
FORMAT = "tdmpc_jax-onnx"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
QUANT_MODES = ("dynamic", "static")
KEEP_FP32 = "keep_fp32"  # nodes whose name starts with this stay in fp32 in the int8 variant

# the first-layer biases that hold a task's folded embedding
_TASK_LEAVES = (("encoder", "layer_0", "dense", "bias"), ("pi_head", "layer_0", "dense", "bias"),
                ("dynamics", "layer_0", "dense", "bias"), ("reward_head", "layer_0", "dense", "bias"),
                ("qs", "ensemble", "layer_0", "dense", "bias"))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# --- params: the planner's prepared (task-conditioned, fused) tree as numpy --------------------------------

def prepared_params(cfg: ModelConfig, params, task: Optional[int]):
    """-> (single-task cfg, numpy params of `planner.prepare`, {leaf path: (num_tasks, ...) table} or None).

    task=None on a multi-task model: the params of task 0 plus per-task tables of the task-dependent
    biases (the graph gathers a row by the task id input); else everything folded for `task`."""
    import jax
    import jax.numpy as jnp

    from tdmpc_jax import planner
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    cfg1, pp = planner.prepare(cfg, params, jnp.int32(0 if task is None else task))
    pp = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), pp)
    tables = None
    if cfg.multitask and task is None:
        leaves = jax.jit(jax.vmap(lambda t: tuple(_get(planner.prepare(cfg, params, t)[1], p) for p in _TASK_LEAVES)))
        tables = {p: np.asarray(v, np.float32) for p, v in zip(_TASK_LEAVES, leaves(jnp.arange(cfg.num_tasks)))}
    return cfg1, pp, tables


def task_constants(cfg: ModelConfig):
    """(num_tasks or 1, A) action masks and (num_tasks or 1,) discounts, as numpy."""
    from tdmpc_jax import networks
    return np.asarray(networks.action_masks(cfg), np.float32), np.asarray(networks.discounts(cfg), np.float32)


# --- a small graph builder -----------------------------------------------------------------------------------

class _Graph:
    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._n = 0
        self._small = {}
        self._named = {}

    def fresh(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype=np.float32, name=None):
        arr = np.asarray(value, dtype)
        if name is not None:
            if name not in self._named:
                self.inits.append(numpy_helper.from_array(arr, name))
                self._named[name] = name
            return name
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if arr.size <= 64 and key in self._small:
            return self._small[key]
        out = self.fresh("const")
        self.inits.append(numpy_helper.from_array(arr, out))
        if arr.size <= 64:
            self._small[key] = out
        return out

    def i64(self, value):
        return self.const(value, np.int64)

    def op(self, op_type, *inputs, outputs=1, name=None, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name or self.fresh("n"), **attrs))
        return outs[0] if outputs == 1 else outs

    def add_input(self, name, elem, shape):
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name, value, elem, shape):
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, name, doc="") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tdmpc_jax",
                              doc_string=doc)
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


class _Net:
    """The world model's pieces as graph fragments over one prepared param tree (see `prepared_params`)."""

    def __init__(self, g: _Graph, cfg1: ModelConfig, pp, tables, task, mask, gamma):
        self.g, self.cfg, self.pp, self.tables, self.task = g, cfg1, pp, tables, task
        self.mask, self.gamma = mask, gamma  # tensor names
        self._bias = {}

    def w(self, path, transform=None):
        """A constant weight, named after its param path."""
        name = ".".join(path) + ("" if transform is None else f".{transform[0]}")
        arr = _get(self.pp, path)
        return self.g.const(arr if transform is None else transform[1](arr), name=name)

    def b(self, path, transform=None):
        """A bias: constant, or (multi-task graphs) the task's row of its per-task table, gathered once."""
        path = tuple(path)
        if self.tables is None or path not in self.tables:
            return self.w(path, transform)
        name = ".".join(path) + ".per_task" + ("" if transform is None else f".{transform[0]}")
        if name not in self._bias:
            tab = self.tables[path]
            if transform is not None:
                tab = np.stack([transform[1](r) for r in tab])
            self._bias[name] = self.g.op("Gather", self.g.const(tab, name=name), self.task, axis=0)
        return self._bias[name]

    def dense(self, x, path, kernel="kernel", bias="bias"):
        g = self.g
        # the raw observations' layer stays fp32 in the int8 variant: one activation scale for dims as different
        # as angles and velocities costs 10x more policy error than every other layer together
        keep = g.fresh(KEEP_FP32) if tuple(path[:2]) == ("encoder", "layer_0") else None
        return g.op("Add", g.op("MatMul", x, self.w(path + (kernel,)), name=keep), self.b(path + (bias,)))

    def tail(self, ln_path, h, act):
        """LayerNorm then Mish or SimNorm: the tail of a NormedLinear (`networks.normed_act`)."""
        g = self.g
        x = g.op("LayerNormalization", h, self.w(ln_path + ("scale",)), self.w(ln_path + ("bias",)), axis=-1,
                 epsilon=1e-5)
        if act != "simnorm":
            return _mish(g, x)
        s = g.op("Softmax", g.op("Reshape", x, g.i64([-1, self.cfg.simnorm_dim])), axis=-1)
        return g.op("Reshape", s, g.i64([-1, self.cfg.latent_dim]))

    def mlp(self, path, x, out_act=None, start=0, stop=None):
        """`networks.mlp_forward` over layers [start, stop) of the MLP at `path`."""
        layers = _get(self.pp, path)
        n = len(layers)
        for i in range(start, n if stop is None else stop):
            p = tuple(path) + (f"layer_{i}",)
            act = (out_act or "mish") if i == n - 1 else "mish"
            if "ln" in layers[f"layer_{i}"]:
                x = self.tail(p + ("ln",), self.dense(x, p + ("dense",)), act)
            else:
                x = self.dense(x, p)
        return x

    def encode(self, obs2d):
        return self.mlp(("encoder",), obs2d, "simnorm")

    def two_hot_inv(self, logits):
        """`math.two_hot_inv`: symexp of the expected bin centre; -> (...,)."""
        g, c = self.g, self.cfg
        if c.num_bins == 1:
            x = g.op("Squeeze", logits, g.i64([-1]))
        else:
            centres = np.linspace(c.vmin, c.vmax, c.num_bins, dtype=np.float32)[:, None]  # (nb, 1): 1-D is 9x slower
            x = g.op("MatMul", g.op("Softmax", logits, axis=-1), g.const(centres), name=g.fresh(KEEP_FP32))
            x = g.op("Squeeze", x, g.i64([-1]))
        return g.op("Mul", g.op("Sign", x), g.op("Sub", g.op("Exp", g.op("Abs", x)), g.const(1.0)))

    def pi_dist(self, z, log_std=True):
        """Masked pre-squash mean and squashed log_std (`networks.pi_dist`; log_std None unless asked)."""
        g, c, A = self.g, self.cfg, self.cfg.action_dim
        n = len(self.pp["pi_head"])
        h = self.mlp(("pi_head",), z, stop=n - 1)
        last = ("pi_head", f"layer_{n - 1}")  # the out layer as two matmuls (a Split of (N, 2A) is slower)
        mean, raw = (g.op("Add", g.op("MatMul", h, self.w(last + ("kernel",), (part, sl))),
                          self.w(last + ("bias",), (part, sl))) if part == "mean" or log_std else None
                     for part, sl in (("mean", lambda x: x[..., :A]), ("log_std", lambda x: x[..., A:])))
        if not log_std:
            return g.op("Mul", mean, self.mask), None
        log_std = g.op("Add", g.const(c.log_std_min), g.op("Mul", g.const(0.5 * (c.log_std_max - c.log_std_min)),
                                                             g.op("Add", g.op("Tanh", raw), g.const(1.0))))
        return g.op("Mul", mean, self.mask), g.op("Mul", log_std, self.mask)

    def pi_from_eps(self, z, eps):
        g = self.g
        mean, log_std = self.pi_dist(z)
        return g.op("Tanh", g.op("Add", mean, g.op("Mul", g.op("Mul", eps, self.mask), g.op("Exp", log_std))))

    def q_avg(self, z, a, q_idx):
        """Mean decoded value of two Q members (`planner._q_avg`); q_idx (2,) picks them when num_q > 2."""
        g, c = self.g, self.cfg
        x = g.op("Concat", z, a, axis=-1)
        # one matmul per member: a fused (in, 2M) matmul would cost onnxruntime a Split copy of its output
        if c.num_q <= 2:
            members = [_Member(self, m, None) for m in range(c.num_q)]
        else:  # a random pair: weights gathered by the q_idx input (left in fp32 by int8 quantization)
            members = [_Member(self, None, g.op("Gather", q_idx, g.i64(m), axis=0)) for m in range(2)]
        vals = []
        for member in members:
            h = g.op("Add", g.op("MatMul", x, member.w(("layer_0", "dense", "kernel"))),
                     member.w(("layer_0", "dense", "bias"), bias=True))
            vals.append(member.finish(h))
        total = vals[0]
        for v in vals[1:]:
            total = g.op("Add", total, v)
        return g.op("Div", total, g.const(float(len(vals))))


class _Member:
    """One Q member: its weights by constant index m, or gathered by a runtime index."""

    def __init__(self, net: _Net, m, idx):
        self.net, self.m, self.idx = net, m, idx

    def w(self, path, bias=False):
        net, g = self.net, self.net.g
        full = ("qs", "ensemble") + tuple(path)
        if self.idx is None:
            m = self.m
            if bias and net.tables is not None and full in net.tables:
                return net.b(full, (f"m{m}", lambda b: b[m]))
            return net.w(full, (f"m{m}", lambda k: k[m]))
        src = net.b(full) if bias else net.w(full)  # a per-task bias: (num_q, M) gathered for the task
        return g.op("Gather", src, self.idx, axis=0)

    def finish(self, h):
        """LN+Mish of the first layer's output h, then the member's other layers -> decoded value."""
        net, g = self.net, self.net.g
        x = self._tail(("layer_0", "ln"), h)
        layers = _get(net.pp, ("qs", "ensemble"))
        n = len(layers)
        for i in range(1, n):
            p = (f"layer_{i}",)
            if "ln" in layers[f"layer_{i}"]:
                hh = g.op("Add", g.op("MatMul", x, self.w(p + ("dense", "kernel"))), self.w(p + ("dense", "bias")))
                x = self._tail(p + ("ln",), hh)
            else:
                x = g.op("Add", g.op("MatMul", x, self.w(p + ("kernel",))), self.w(p + ("bias",)))
        return net.two_hot_inv(x)

    def _tail(self, ln_path, h):
        g = self.net.g
        x = g.op("LayerNormalization", h, self.w(ln_path + ("scale",)), self.w(ln_path + ("bias",)), axis=-1,
                 epsilon=1e-5)
        return _mish(g, x)


def _mish(g: _Graph, x):
    """`networks.mish`: x t / (t + 2), t = n (n + 2), n = e^min(x, 20) (t / (t + 2) is exactly 1 above 20).

    onnxruntime's own Mish goes through a Softplus 10x slower than these seven vectorised ops, and Log
    is 8x slower than Exp: either would take half of an int8 MPPI action."""
    n = g.op("Exp", g.op("Min", x, g.const(20.0)))
    t = g.op("Mul", n, g.op("Add", n, g.const(2.0)))
    return g.op("Div", g.op("Mul", x, t), g.op("Add", t, g.const(2.0)))


# --- the two graphs ------------------------------------------------------------------------------------------

def _task_inputs(g: _Graph, cfg: ModelConfig, task: Optional[int], tables, batch_shape, discount=True):
    """The task input (multi-task graphs), mask and (if asked) discount tensors."""
    masks, discounts = task_constants(cfg)
    if tables is None:
        t = 0 if task is None else task
        return None, g.const(masks[t], name="action_mask"), \
            g.const(discounts[t], name="discount") if discount else None
    tid = g.add_input("task", TensorProto.INT64, batch_shape)
    mask = g.op("Gather", g.const(masks, name="action_mask.per_task"), tid, axis=0)
    gamma = g.op("Gather", g.const(discounts, name="discount.per_task"), tid, axis=0) if discount else None
    return tid, mask, gamma


def policy_graph(cfg: ModelConfig, params, task: Optional[int] = None) -> onnx.ModelProto:
    """obs (B, O) [, task (B,) int64] -> action (B, A): `planner.policy_act` in eval mode, batched."""
    cfg1, pp, tables = prepared_params(cfg, params, task)
    g = _Graph()
    obs = g.add_input("obs", TensorProto.FLOAT, ["batch", cfg.obs_dim])
    tid, mask, gamma = _task_inputs(g, cfg, task, tables, ["batch"], discount=False)
    net = _Net(g, cfg1, pp, tables, tid, mask, gamma)
    mean, _ = net.pi_dist(net.encode(obs), log_std=False)
    g.add_output("action", g.op("Tanh", mean), TensorProto.FLOAT, ["batch", cfg.action_dim])
    return g.model("policy", "tdmpc_jax policy prior: tanh(mean) of pi(encode(obs)), eval mode")


def noise_shapes(cfg: ModelConfig, pcfg) -> Dict[str, tuple]:
    """Shapes of the MPPI graph's noise inputs (`planner.PlanNoise` fields; the Q pairs only when num_q > 2)."""
    H, A, N, P, E = pcfg.horizon, cfg.action_dim, pcfg.num_samples, pcfg.num_pi_trajs, pcfg.num_elites
    iters = pcfg.iterations_for(A)
    out = {"pi_eps": (H, P, A), "pi_val_eps": (P, A), "eps": (iters, H, N - P, A), "val_eps": (iters, N - P, A),
           "gumbel": (E,)}
    if cfg.num_q > 2:
        out.update(pi_val_q=(2,), val_q=(iters, 2))
    return out


def mppi_graph(cfg: ModelConfig, params, pcfg, task: Optional[int] = None, eval_mode: bool = True) -> onnx.ModelProto:
    """One MPPI action, `planner.plan_with_noise` (lean path) unrolled over its iterations."""
    cfg1, pp, tables = prepared_params(cfg, params, task)
    H, A, N, P, E = pcfg.horizon, cfg.action_dim, pcfg.num_samples, pcfg.num_pi_trajs, pcfg.num_elites
    L = cfg.latent_dim
    iters = pcfg.iterations_for(A)
    g = _Graph()
    obs = g.add_input("obs", TensorProto.FLOAT, [cfg.obs_dim])
    tid, mask, gamma = _task_inputs(g, cfg, task, tables, [])
    prev = g.add_input("prev_mean", TensorProto.FLOAT, [H, A])
    t0 = g.add_input("t0", TensorProto.BOOL, [])
    shapes = noise_shapes(cfg, pcfg)
    nz = {k: g.add_input(k, TensorProto.INT64 if k.endswith("_q") else TensorProto.FLOAT, list(s))
          for k, s in shapes.items()}
    if not eval_mode:
        nz["explore"] = g.add_input("explore", TensorProto.FLOAT, [A])
    net = _Net(g, cfg1, pp, tables, tid, mask, gamma)

    z0 = net.encode(g.op("Unsqueeze", obs, g.i64([0])))                     # (1, L)
    # the reward and dynamics first layers (fused into one matmul in JAX; here two, see q_avg)
    heads = ("reward_head", "dynamics")
    first_k = {h: (h, "layer_0", "dense", "kernel") for h in heads}
    first_b = {h: (h, "layer_0", "dense", "bias") for h in heads}
    ka = {h: net.w(first_k[h], ("a", lambda k: k[L:])) for h in heads}
    zfirst = {h: g.op("Add", g.op("MatMul", z0, net.w(first_k[h], ("z", lambda k: k[:L]))), net.b(first_b[h]))
              for h in heads}                                                # z0 @ W_z + b, once per action
    discs = [gamma]
    for _ in range(H - 1):
        discs.append(g.op("Mul", discs[-1], gamma))

    def at(x, i, axis=0):
        return g.op("Gather", x, g.i64(i), axis=axis)

    def value(actions, pi_eps, q_idx):
        """`planner.estimate_value_lean`: actions (H, n, A) -> (n,)."""
        a0 = at(actions, 0)
        first = {h: g.op("Add", zfirst[h], g.op("MatMul", a0, ka[h])) for h in heads}
        G = None
        for t in range(H):
            r_h, d_h = first["reward_head"], first["dynamics"]
            r = net.two_hot_inv(net.mlp(("reward_head",), net.tail(("reward_head", "layer_0", "ln"), r_h, "mish"),
                                        start=1))
            z = net.mlp(("dynamics",), net.tail(("dynamics", "layer_0", "ln"), d_h, "mish"), "simnorm", start=1)
            G = r if t == 0 else g.op("Add", G, g.op("Mul", discs[t - 1], r))
            if t + 1 < H:
                za = g.op("Concat", z, at(actions, t + 1), axis=-1)
                first = {h: net.dense(za, (h, "layer_0", "dense")) for h in heads}
        a = net.pi_from_eps(z, pi_eps)
        v = g.op("Add", G, g.op("Mul", discs[H - 1], net.q_avg(z, a, q_idx)))
        big = float(np.finfo(np.float32).max)  # jnp.nan_to_num: NaN -> 0, +-inf -> +-max
        return g.op("Where", g.op("IsNaN", v), g.const(0.0), g.op("Clip", v, g.const(-big), g.const(big)))

    if P > 0:  # policy trajectories, valued once
        z = g.op("Expand", z0, g.i64([P, L]))
        pi_actions = []
        for t in range(H):
            a = net.pi_from_eps(z, at(nz["pi_eps"], t))
            pi_actions.append(g.op("Unsqueeze", a, g.i64([0])))
            if t < H - 1:
                z = net.mlp(("dynamics",), g.op("Concat", z, a, axis=-1), "simnorm")
        pi_actions = g.op("Mul", g.op("Concat", *pi_actions, axis=0), mask)   # (H, P, A)
        pi_value = value(pi_actions, nz["pi_val_eps"], nz.get("pi_val_q"))
    zeros_ha = g.const(np.zeros((H, A), np.float32))
    shifted = g.op("Concat", g.op("Slice", prev, g.i64([1]), g.i64([H]), g.i64([0])),
                   g.const(np.zeros((1, A), np.float32)), axis=0)
    mean = g.op("Where", t0, zeros_ha, shifted)
    std = g.const(np.full((H, A), pcfg.max_std, np.float32))
    ax1 = g.i64([1])
    for i in range(iters):
        eps = at(nz["eps"], i)
        sampled = g.op("Mul", g.op("Clip", g.op("Add", g.op("Unsqueeze", mean, ax1),
                                                g.op("Mul", g.op("Unsqueeze", std, ax1), eps)),
                                   g.const(-1.0), g.const(1.0)), mask)
        val = value(sampled, at(nz["val_eps"], i), at(nz["val_q"], i) if "val_q" in nz else None)
        if P > 0:
            actions = g.op("Concat", pi_actions, sampled, axis=1)
            val = g.op("Concat", pi_value, val, axis=0)
        else:
            actions = sampled
        elite_value, elite_idx = g.op("TopK", val, g.i64([E]), outputs=2, axis=0, largest=1, sorted=1)
        elites = g.op("Gather", actions, elite_idx, axis=1)                  # (H, E, A)
        vmax = g.op("ReduceMax", elite_value, keepdims=0)
        score = g.op("Exp", g.op("Mul", g.const(pcfg.temperature), g.op("Sub", elite_value, vmax)))
        score = g.op("Div", score, g.op("ReduceSum", score, keepdims=0))
        denom = g.op("Add", g.op("ReduceSum", score, keepdims=0), g.const(1e-9))
        sc = g.op("Unsqueeze", score, g.i64([0, 2]))                           # (1, E, 1)
        mean = g.op("Div", g.op("ReduceSum", g.op("Mul", elites, sc), ax1, keepdims=0), denom)
        diff = g.op("Sub", elites, g.op("Unsqueeze", mean, ax1))
        var = g.op("Div", g.op("ReduceSum", g.op("Mul", g.op("Mul", diff, diff), sc), ax1, keepdims=0), denom)
        std = g.op("Clip", g.op("Sqrt", var), g.const(pcfg.min_std), g.const(pcfg.max_std))
        mean, std = g.op("Mul", mean, mask), g.op("Mul", std, mask)
    choice = g.op("ArgMax", g.op("Add", nz["gumbel"], g.op("Log", score)), axis=0, keepdims=0)
    a = g.op("Gather", at(elites, 0), choice, axis=0)
    if not eval_mode:
        a = g.op("Add", a, g.op("Mul", at(std, 0), nz["explore"]))
    g.add_output("action", g.op("Clip", a, g.const(-1.0), g.const(1.0)), TensorProto.FLOAT, [A])
    g.add_output("mean", mean, TensorProto.FLOAT, [H, A])
    return g.model("mppi", f"tdmpc_jax MPPI action: {iters} iterations x {N} samples, horizon {H}")


# --- precision variants ----------------------------------------------------------------------------------------

def to_fp16(model: onnx.ModelProto, min_size: int = 256) -> onnx.ModelProto:
    """Weights (float initializers of >= min_size values) stored in fp16, cast back to fp32 in the graph
    (onnxruntime folds the casts when it loads the model: fp32 compute on fp16-rounded weights)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    casts, keep = [], []
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_size:
            arr = numpy_helper.to_array(init)
            half = numpy_helper.from_array(arr.astype(np.float16), init.name + ".fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
        else:
            keep.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def quantize_int8(src: str, dst: str, mode: str = "dynamic", calibration: Optional[Sequence[dict]] = None):
    """int8 MatMul weights (per output channel, symmetric) with onnxruntime.quantization.

    mode 'dynamic': activations quantized per call to uint8 from their own range; 'static': QDQ with
    activation ranges calibrated (MinMax) on `calibration`, a list of input feeds of real observations."""
    import logging
    keep = [n.name for n in onnx.load(src, load_external_data=False).graph.node if n.name.startswith(KEEP_FP32)]
    root = logging.getLogger()  # the quantizer logs every tensor it leaves alone, and suggests pre-processing
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize(src, dst, mode, calibration, keep)
    finally:
        root.setLevel(level)


def _quantize(src, dst, mode, calibration, keep):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    if mode == "dynamic":
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=keep, extra_options={"MatMulConstBOnly": True})
        return
    if mode != "static":
        raise ValueError(f"unknown quantization mode {mode!r} (known: {', '.join(QUANT_MODES)})")
    if not calibration:
        raise ValueError("static int8 quantization needs calibration inputs (real observations)")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            return next(self._it, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=keep, extra_options={"MatMulConstBOnly": True})


# --- the exported directory ----------------------------------------------------------------------------------

def _feeds_policy(obs, task_ids, multitask):
    feed = {"obs": np.asarray(obs, np.float32)}
    if multitask:
        feed["task"] = np.asarray(task_ids, np.int64)
    return feed


def _mppi_feeds(cfg, pcfg, obs, task_ids, multitask, seed=0, eval_mode=True):
    """MPPI graph inputs for real observations: cold and warm starts, numpy noise (the runtime's draws)."""
    from tdmpc_jax_runtime import draw_noise
    rng = np.random.default_rng(seed)
    feeds = []
    for i, (o, t) in enumerate(zip(obs, task_ids)):
        f = {"obs": np.asarray(o, np.float32), "prev_mean": rng.uniform(-1, 1, (pcfg.horizon, cfg.action_dim))
             .astype(np.float32) * np.asarray(task_constants(cfg)[0][t if multitask else 0]),
             "t0": np.asarray(i % 2 == 0)}
        if multitask:
            f["task"] = np.asarray(t, np.int64)
        f.update(draw_noise(noise_shapes(cfg, pcfg), cfg.num_q, rng))
        if not eval_mode:
            f["explore"] = rng.standard_normal(cfg.action_dim, dtype=np.float32)
        feeds.append(f)
    return feeds


def _session(path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def export_agent(agent, out_dir, *, task: Optional[str] = None, pcfg=None, mpc: bool = True,
                 precisions: Sequence[str] = PRECISIONS, int8_mode: str = "dynamic", calibration=None,
                 calibration_source: str = "", check: bool = True, log=print) -> dict:
    """Write OUT/policy.<precision>.onnx (and OUT/mppi.<precision>.onnx with `mpc`) and OUT/manifest.json.

    task: a task name -> single-task slice (its embedding folded in), else multi-task graphs (task id input).
    calibration: (obs (n, O), task ids (n,)) real observations, e.g. from a dataset the teacher collected:
    static int8 calibration, and the fp16 / int8 errors recorded in the manifest. `check`: also record the
    fp32 graphs' max |difference| to the JAX functions (policy_act, plan_with_noise) on those observations.
    The directory is replaced as a whole (atomic). -> the manifest."""
    import jax
    import jax.numpy as jnp

    from tdmpc_jax import atomic, planner
    cfg = agent.config
    pcfg = pcfg or planner.PlannerConfig()
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32 and be among {', '.join(PRECISIONS)}, got {list(precisions)}")
    if int8_mode not in QUANT_MODES:
        raise ValueError(f"unknown int8 mode {int8_mode!r} (known: {', '.join(QUANT_MODES)})")
    task_id = None
    if task is not None:
        if not cfg.multitask:
            raise ValueError(f"task {task!r}: the checkpoint is single-task (its graphs need no task)")
        task_id = cfg.task_index(task)
    multitask = cfg.multitask and task_id is None
    if calibration is None:  # no real observations given: standard normal ones (reported as such)
        rng = np.random.default_rng(0)
        n = 64
        ids = rng.integers(0, max(cfg.num_tasks, 1), n) if task_id is None else np.full(n, task_id)
        calibration, calibration_source = (rng.standard_normal((n, cfg.obs_dim)).astype(np.float32), ids), \
            "standard normal observations (no dataset given)"
    cal_obs, cal_task = np.asarray(calibration[0], np.float32), np.asarray(calibration[1], np.int64)
    if task_id is not None:
        keep = cal_task == task_id
        if keep.any():
            cal_obs, cal_task = cal_obs[keep], cal_task[keep]
        else:
            cal_task = np.full(len(cal_obs), task_id)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), agent.params)
    graphs = {"policy": lambda: policy_graph(cfg, params, task_id)}
    if mpc:
        graphs["mppi"] = lambda: mppi_graph(cfg, params, pcfg, task_id)
    manifest = {"format": FORMAT, "version": 1, "written_by": "tdmpc_jax", "source": str(
        agent.metadata.get("source", "")), "config": cfg.to_dict(), "task": task, "task_id": task_id,
                "obs_dim": cfg.obs_dim, "action_dim": cfg.action_dim,
                "planner": dict(dataclasses.asdict(pcfg), iterations_used=pcfg.iterations_for(cfg.action_dim)),
                "eval_mode": True, "noise": {k: list(v) for k, v in noise_shapes(cfg, pcfg).items()} if mpc else {},
                "graphs": {}, "int8": {"mode": int8_mode, "calibration": calibration_source,
                                       "observations": int(len(cal_obs))}, "checks": {}}

    def build(d):
        os.makedirs(d)
        for kind, make in graphs.items():
            log(f"  {kind}: building the fp32 graph ...")
            files = manifest["graphs"][kind] = {}
            fp32 = os.path.join(d, f"{kind}.fp32.onnx")
            onnx.save(make(), fp32)
            files["fp32"] = os.path.basename(fp32)
            if "fp16" in precisions:
                onnx.save(to_fp16(onnx.load(fp32)), os.path.join(d, f"{kind}.fp16.onnx"))
                files["fp16"] = f"{kind}.fp16.onnx"
            if "int8" in precisions:
                log(f"  {kind}: int8 ({int8_mode}) ...")
                feeds = None
                if int8_mode == "static":
                    feeds = ([_feeds_policy(cal_obs[i:i + 1], cal_task[i:i + 1], multitask) for i in
                              range(len(cal_obs))] if kind == "policy" else
                             _mppi_feeds(cfg, pcfg, cal_obs[:16], cal_task[:16], multitask))
                quantize_int8(fp32, os.path.join(d, f"{kind}.int8.onnx"), int8_mode, feeds)
                files["int8"] = f"{kind}.int8.onnx"
            for f in list(files.values()):
                manifest.setdefault("bytes", {})[f] = os.path.getsize(os.path.join(d, f))
        _checks(d)
        with open(os.path.join(d, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)

    def _checks(d):
        """fp32 vs JAX; fp16 / int8 vs fp32 (policy: every calibration observation; MPPI: a few)."""
        checks = manifest["checks"]
        sess = {(k, p): _session(os.path.join(d, f)) for k, files in manifest["graphs"].items() for p, f in
                files.items()}
        feed = _feeds_policy(cal_obs, cal_task, multitask)
        # one observation per call, as deployed (int8 activations are quantized per call)
        pol = {p: np.concatenate([sess["policy", p].run(None, {k: v[i:i + 1] for k, v in feed.items()})[0]
                                  for i in range(len(cal_obs))]) for p in manifest["graphs"]["policy"]}
        if check:
            ref = jax.jit(jax.vmap(lambda o, t: planner.policy_act(cfg, params, o, t, jax.random.PRNGKey(0))))(
                jnp.asarray(cal_obs), jnp.asarray(cal_task if cfg.multitask else np.zeros_like(cal_task)))
            checks["policy_fp32_vs_jax_max_abs"] = float(np.abs(pol["fp32"] - np.asarray(ref)).max())
        for p in pol:
            if p != "fp32":
                checks[f"policy_{p}_vs_fp32_mean_abs"] = float(np.abs(pol[p] - pol["fp32"]).mean())
                checks[f"policy_{p}_vs_fp32_max_abs"] = float(np.abs(pol[p] - pol["fp32"]).max())
        if "mppi" not in manifest["graphs"]:
            return
        feeds = _mppi_feeds(cfg, pcfg, cal_obs[:4], cal_task[:4], multitask, seed=1)
        outs = {p: [sess["mppi", p].run(None, f) for f in feeds] for p in manifest["graphs"]["mppi"]}
        if check:
            log("  mppi: checking against the JAX planner ...")
            fn = jax.jit(lambda o, t, m, t0, nz: planner.plan_with_noise(cfg, pcfg, params, o, t, m, t0, nz))
            diffs = []
            for f, (a, mean) in zip(feeds, outs["fp32"]):
                ja, jm = fn(f["obs"], f.get("task", task_id or 0), f["prev_mean"], f["t0"], _plan_noise(cfg, pcfg, f))
                diffs.append(max(float(np.abs(a - ja).max()), float(np.abs(mean - jm).max())))
            checks["mppi_fp32_vs_jax_max_abs"] = max(diffs)
        for p in outs:  # the action is one elite drawn at random: the refit mean shows the planner's drift
            if p != "fp32":
                for i, what in ((0, "action"), (1, "mean")):
                    checks[f"mppi_{p}_vs_fp32_{what}_mean_abs"] = float(np.mean(
                        [np.abs(o[i] - r[i]).mean() for o, r in zip(outs[p], outs["fp32"])]))

    atomic.replace_dir(os.path.abspath(out_dir), build)
    return manifest


def _plan_noise(cfg, pcfg, feed):
    """A graph feed's noise as a `planner.PlanNoise` (for comparing with `plan_with_noise`)."""
    import jax.numpy as jnp

    from tdmpc_jax import planner
    iters = pcfg.iterations_for(cfg.action_dim)
    q = lambda k, shape: jnp.asarray(feed[k], jnp.int32) if k in feed else jnp.tile(jnp.arange(2, dtype=jnp.int32),
                                                                                      shape[:-1] + (1,))
    return planner.PlanNoise(jnp.asarray(feed["pi_eps"]), jnp.asarray(feed["pi_val_eps"]), q("pi_val_q", (2,)),
                             jnp.asarray(feed["eps"]), jnp.asarray(feed["val_eps"]), q("val_q", (iters, 2)),
                             jnp.asarray(feed["gumbel"]), jnp.asarray(feed.get("explore", np.zeros(cfg.action_dim,
                                                                                                   np.float32))))


def calibration_from_dataset(ds, cfg: ModelConfig, max_obs: int = 512, seed: int = 0):
    """Real observations for calibration: a random subset of a dataset's steps (e.g. one the teacher collected,
    `tdmpc_jax.data.collect.collect`) -> (obs (n, cfg.obs_dim) zero-padded, task ids of `cfg` (n,))."""
    if ds.obs_dim > cfg.obs_dim:
        raise ValueError(f"{ds.path}: observations have {ds.obs_dim} dims, the model takes {cfg.obs_dim}")
    if cfg.multitask:
        unknown = [t for t in ds.tasks if t not in cfg.tasks]
        if unknown:
            raise ValueError(f"{ds.path}: task {unknown[0]!r} is not among the model's tasks")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(ds.num_steps, size=min(max_obs, ds.num_steps), replace=False))
    obs = np.asarray(ds.arrays["obs"][idx], np.float32)
    ids = np.asarray([cfg.task_index(ds.tasks[t]) if cfg.multitask else 0 for t in ds.arrays["task"][idx]], np.int64)
    return np.pad(obs, ((0, 0), (0, cfg.obs_dim - ds.obs_dim))), ids
