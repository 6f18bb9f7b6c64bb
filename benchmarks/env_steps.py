"""Env steps/s: the batched stepper (all MT30 tasks x N episodes) vs stepping envs one at a time.

  python benchmarks/env_steps.py [--episodes=10] [--steps=50] [--threads=2]
Prints a table and a JSON line; the baseline (one env at a time, same envs, same actions) is
measured in the same run.
"""
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "disable")

import numpy as np
from absl import app, flags

from tdmpc_jax import envs
from tdmpc_jax.config import MT30_TASKS

flags.DEFINE_integer("episodes", 10, "episodes per task (slots = 30 x episodes)")
flags.DEFINE_integer("steps", 50, "agent steps timed per slot")
flags.DEFINE_integer("workers", 2, "worker processes for the batched stepper")
FLAGS = flags.FLAGS


def main(_):
    slots = [(t, 1, e) for t in MT30_TASKS for e in range(FLAGS.episodes)]
    n = len(slots)
    rng = np.random.RandomState(0)
    acts = rng.uniform(-1, 1, size=(FLAGS.steps, n, 6)).astype(np.float32)
    print(f"building {n} environments ...", flush=True)
    single = [envs.make(t, s) for t, s, _ in slots]
    for e in single:
        e.reset()
    t0 = time.perf_counter()
    for t in range(FLAGS.steps):
        for j, e in enumerate(single):
            e.step(acts[t, j, : e.action_dim])
    t_single = time.perf_counter() - t0
    res = {"slots": n, "steps": FLAGS.steps, "one_by_one_steps_per_s": n * FLAGS.steps / t_single}
    for threads in sorted({0, FLAGS.workers}):
        with envs.BatchedEnv.for_episodes(slots, num_workers=threads) as b:
            b.reset()
            t0 = time.perf_counter()
            for t in range(FLAGS.steps):
                b.step(acts[t])
            dt = time.perf_counter() - t0
        res[f"batched_workers{threads}_steps_per_s"] = n * FLAGS.steps / dt
        res[f"batched_workers{threads}_vs_one_by_one"] = t_single / dt
    print(f"{'mode':28s} {'env steps/s':>12s} {'ratio':>7s}")
    print(f"{'one env at a time':28s} {res['one_by_one_steps_per_s']:12.0f} {1.0:7.2f}")
    for threads in sorted({0, FLAGS.workers}):
        print(f"{f'batched, {threads} workers':28s} {res[f'batched_workers{threads}_steps_per_s']:12.0f} "
              f"{res[f'batched_workers{threads}_vs_one_by_one']:7.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    app.run(main)
