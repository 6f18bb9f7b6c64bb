"""Run an exported tdmpc_jax agent with numpy and onnxruntime only: no JAX, no Flax, no tdmpc_jax.

    from tdmpc_jax_runtime import OnnxAgent
    agent = OnnxAgent("exported/", precision="int8")     # a directory written by experiments/export.py
    a = agent.policy(obs, task="walker-walk")             # the policy prior (eval mode), obs (O,) or (B, O)
    agent.reset()                                         # a new episode: the next plan() starts cold
    a = agent.plan(obs, task="walker-walk")               # one MPPI action; the warm-start mean is carried

`plan` draws the planner's random numbers with numpy (the same distributions as `planner.draw_noise`) and
feeds them to the MPPI graph, which is a deterministic function of (obs, task, previous mean, t0, noise).
Observations shorter than the model's (a task of a multi-task model) are zero-padded; actions come back
padded to the model's action dims (a task's unused dims are 0).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import onnxruntime as ort

FORMAT = "tdmpc_jax-onnx"
MANIFEST = "manifest.json"
__all__ = ["OnnxAgent", "draw_noise", "read_manifest"]


def read_manifest(directory) -> dict:
    path = os.path.join(os.fspath(directory), MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: not an ONNX export (no {MANIFEST})") from None
    except ValueError as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tdmpc_jax ONNX export")
    return m


def draw_noise(shapes: dict, num_q: int, rng: np.random.Generator) -> dict:
    """The MPPI graph's noise inputs: standard normals, Gumbel noise for the elite choice, random Q pairs."""
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if name.endswith("_q"):
            rows = int(np.prod(shape[:-1]))
            pairs = np.stack([rng.permutation(num_q)[:2] for _ in range(rows)])
            out[name] = pairs.reshape(shape).astype(np.int64)
        elif name == "gumbel":
            out[name] = rng.gumbel(size=shape).astype(np.float32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def _session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OnnxAgent:
    """The exported policy prior and MPPI planner of one directory, in one precision (fp32/fp16/int8)."""

    def __init__(self, directory, precision: str = "fp32", threads: int = 1, seed: int = 0, mpc: bool = True):
        self.directory = os.fspath(directory)
        self.manifest = m = read_manifest(directory)
        self.precision = precision
        cfg = m["config"]
        self.tasks = tuple(cfg["tasks"])
        self.obs_dim, self.action_dim = int(m["obs_dim"]), int(m["action_dim"])
        self.task = m.get("task")          # a single-task slice's task name (None: multi-task graphs)
        self.task_id = m.get("task_id")
        self.num_q = int(cfg["num_q"])
        self.horizon = int(m["planner"]["horizon"])
        self.noise_shapes = {k: tuple(v) for k, v in m["noise"].items()} if m.get("noise") else {}
        self.rng = np.random.default_rng(seed)
        self._sessions = {}
        for kind in ("policy",) + (("mppi",) if mpc and "mppi" in m["graphs"] else ()):
            files = m["graphs"][kind]
            if precision not in files:
                raise ValueError(f"{self.directory}: no {precision} {kind} graph (have: {', '.join(files)})")
            self._sessions[kind] = _session(os.path.join(self.directory, files[precision]), threads)
        self._multitask = any(i.name == "task" for i in self._sessions["policy"].get_inputs())
        self._feed1 = {"obs": np.zeros((1, self.obs_dim), np.float32)}
        if self._multitask:
            self._feed1["task"] = np.zeros(1, np.int64)
        self._mean = np.zeros((self.horizon, self.action_dim), np.float32)
        self._cold = True
        self._means = None  # per-problem warm starts of act_batch

    # --- inputs -------------------------------------------------------------------------------------
    def _task_ids(self, task, n):
        if task is None:
            if self._multitask:
                raise ValueError("this export is multi-task: give a task (name or id)")
            return None
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r} for this model")
            task = self.tasks.index(task)
        ids = np.broadcast_to(np.asarray(task, np.int64), (n,)).copy()
        if not self._multitask:
            if self.task_id is not None and np.any(ids != self.task_id):
                raise ValueError(f"this export is a single-task slice of {self.task!r} (task id {self.task_id})")
            return None
        if ids.min() < 0 or ids.max() >= len(self.tasks):
            raise ValueError(f"task ids must lie in [0, {len(self.tasks)})")
        return ids

    def _obs(self, obs):
        obs = np.asarray(obs, np.float32)
        single = obs.ndim == 1
        obs = obs[None] if single else obs
        if obs.ndim != 2 or obs.shape[1] > self.obs_dim:
            raise ValueError(f"obs must have shape (O,) or (B, O) with O <= {self.obs_dim}, got {obs.shape}")
        if obs.shape[1] < self.obs_dim:
            obs = np.pad(obs, ((0, 0), (0, self.obs_dim - obs.shape[1])))
        return np.ascontiguousarray(obs), single

    # --- acting -------------------------------------------------------------------------------------
    def policy(self, obs, task=None):
        """The policy prior's action tanh(mean): obs (O,) -> (A,), or (B, O) -> (B, A)."""
        if (type(obs) is np.ndarray and obs.shape == (self.obs_dim,) and obs.dtype == np.float32
                and (type(task) is int or (task is None and not self._multitask))):
            return self._policy_one(obs, task)  # the control-loop call: one observation, a task id
        obs, single = self._obs(obs)
        feed = {"obs": obs}
        ids = self._task_ids(task, obs.shape[0])
        if ids is not None:
            feed["task"] = ids
        a = self._sessions["policy"].run(None, feed)[0]
        return a[0] if single else a

    def _policy_one(self, obs, task):
        """One observation through reused input buffers (a quarter of the call's overhead)."""
        feed = self._feed1
        feed["obs"][0] = obs
        if self._multitask:
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task ids must lie in [0, {len(self.tasks)})")
            feed["task"][0] = task
        elif task is not None and self.task_id is not None and task != self.task_id:
            raise ValueError(f"this export is a single-task slice of {self.task!r} (task id {self.task_id})")
        return self._sessions["policy"].run(None, feed)[0][0]

    def reset(self):
        """Start a new episode: the next `plan` starts from a zero mean (t0)."""
        self._cold = True

    def plan(self, obs, task=None, t0: Optional[bool] = None, noise: Optional[dict] = None):
        """One MPPI action for one observation (O,); carries the warm-start mean to the next call.

        t0: first step of an episode (default: the first call after construction or `reset`).
        noise: the graph's noise inputs (default: drawn with this agent's numpy Generator)."""
        obs, _ = self._obs(obs)
        t0 = self._cold if t0 is None else bool(t0)
        a, self._mean = self._plan_one(obs[0], self._task_ids(task, 1), self._mean, t0, noise)
        self._cold = False
        return a

    def _plan_one(self, obs, ids, mean, t0, noise=None):
        if "mppi" not in self._sessions:
            raise ValueError(f"{self.directory}: no MPPI graph loaded (exported with --mpc=false?)")
        feed = {"obs": obs, "prev_mean": np.asarray(mean, np.float32), "t0": np.asarray(t0, bool)}
        if ids is not None:
            feed["task"] = np.asarray(ids[0], np.int64)
        feed.update(noise if noise is not None else draw_noise(self.noise_shapes, self.num_q, self.rng))
        a, new_mean = self._sessions["mppi"].run(None, feed)
        return a, new_mean

    def act_batch(self, obs, task, t0, mpc: bool = True):
        """Independent problems in lock-step (an evaluator's episodes): obs (B, O), task (B,), t0 (B,) bool.

        Every problem runs as its own call, as deployed (an int8 graph quantizes its activations per call);
        MPPI keeps each problem's warm start."""
        obs, _ = self._obs(obs)
        n = obs.shape[0]
        ids = self._task_ids(task, n)
        if not mpc:
            feed = {} if ids is None else {"task": ids}
            sess = self._sessions["policy"]
            return np.concatenate([sess.run(None, {"obs": obs[i:i + 1], **{k: v[i:i + 1] for k, v in feed.items()}})[0]
                                   for i in range(n)])
        t0 = np.broadcast_to(np.asarray(t0, bool), (n,))
        if self._means is None or self._means.shape[0] != n:
            self._means = np.zeros((n, self.horizon, self.action_dim), np.float32)
        out = np.zeros((n, self.action_dim), np.float32)
        for i in range(n):
            out[i], self._means[i] = self._plan_one(obs[i], None if ids is None else ids[i:i + 1], self._means[i],
                                                    bool(t0[i]))
        return out
