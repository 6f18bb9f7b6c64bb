"""Evaluation throughput: the lock-step loop vs the overlapped one (`--parts`), with env workers and devices.

  python benchmarks/eval_overlap.py [--checkpoint=checkpoints/td-mpc-opt/mt30_1M_steps_045dist_fp16.pt]
      [--tasks=mt30] [--episodes=2] [--steps=60] [--workers=2] [--parts=2] [--devices=1]
Plays the first --steps lock-step steps of every (task, episode) with MPPI (the official settings) in
each configuration, after one warm-up step compiled outside the timing; prints agent steps/s, where the
time went (waiting for plans, stepping environments), the speed-up against the lock-step baseline
measured in the same run, and a JSON line. Every configuration plays the same transitions (checked).
"""
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "disable")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("checkpoint", os.path.join(REPO, "checkpoints", "td-mpc-opt", "mt30_1M_steps_045dist_fp16.pt"),
                    "checkpoint")
flags.DEFINE_string("tasks", "mt30", "task set or list")
flags.DEFINE_integer("episodes", 2, "episodes per task")
flags.DEFINE_integer("steps", 60, "lock-step steps timed")
flags.DEFINE_integer("workers", 2, "environment worker processes of the worker configurations")
flags.DEFINE_integer("parts", 2, "groups of the overlapped configuration")
flags.DEFINE_integer("devices", 1, "devices to split the problems over (0: all local devices)")
FLAGS = flags.FLAGS


def main(_):
    import tdmpc_jax
    from tdmpc_jax import planner, rollout
    from tdmpc_jax.envs import BatchedEnv
    from tdmpc_jax.evaluation import resolve_tasks
    from tdmpc_jax.planner import PlannerConfig

    agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
    cfg = agent.config
    tasks = resolve_tasks(agent, FLAGS.tasks)
    slots = [(t, 1, e) for t in tasks for e in range(FLAGS.episodes)]
    n = len(slots)
    pcfg = PlannerConfig()
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    task = np.asarray([cfg.task_index(t) if cfg.multitask else 0 for t, _, _ in slots], np.int32)
    devices = jax.local_devices()[:FLAGS.devices or None]
    actor = rollout.make_actor(cfg, pcfg, eval_mode=False, devices=devices)
    keys = rollout.fold_in_keys(1)
    configs = [("lock-step, in-process envs", 0, 1), (f"lock-step, {FLAGS.workers} env workers", FLAGS.workers, 1),
               (f"overlapped ({FLAGS.parts} parts), {FLAGS.workers} env workers", FLAGS.workers, FLAGS.parts)]
    # compile every shape outside the timing: the whole batch and each part
    st = planner.init_state(cfg, pcfg, n)
    obs0 = np.zeros((n, cfg.obs_dim), np.float32)
    for g in {len(g) for g in planner.split_problems(n, FLAGS.parts, actor.align)} | {n}:
        k = jax.random.split(keys(0), g)
        np.asarray(actor.act_keys(params, obs0[:g], task[:g], jax.tree_util.tree_map(lambda x: x[:g], st),
                                  np.zeros(g, bool), k)[0])
    np.asarray(actor(params, obs0, task, st, np.zeros(n, bool), keys(0))[0])
    print(f"{n} problems ({len(tasks)} tasks x {FLAGS.episodes}), {FLAGS.steps} steps, MPPI "
          f"{pcfg.iterations}x{pcfg.num_samples}, {len(devices)} {jax.default_backend()} device(s)", flush=True)
    rows, ref = [], None
    for name, workers, parts in configs:
        acts = []
        with BatchedEnv.for_episodes(slots, num_workers=workers, obs_dim=cfg.obs_dim,
                                     action_dim=cfg.action_dim) as env:
            obs = env.reset()
            timing = {}
            t0 = time.perf_counter()
            rollout.rollout(env, actor, params, task, FLAGS.steps, keys, state=planner.init_state(cfg, pcfg, n),
                            obs=obs, until_done=False, timing=timing, parts=parts,
                            on_step=lambda t, o, a, r, no, d: acts.append(a))
            wall = time.perf_counter() - t0
        acts = np.stack(acts)
        same = ref is None or bool(np.array_equal(acts, ref))
        ref = acts if ref is None else ref
        row = {"config": name, "workers": workers, "parts": parts, "wall_s": wall,
               "agent_steps_per_s": n * FLAGS.steps / wall, "wait_plan_s": timing["act_first_s"] + timing["act_s"],
               "env_s": timing["env_s"], "same_actions_as_baseline": same}
        rows.append(row)
    base = rows[0]["agent_steps_per_s"]
    print(f"{'configuration':44s} {'steps/s':>9s} {'x base':>7s} {'wait plan s':>12s} {'env s':>7s} same")
    for r in rows:
        r["speedup_vs_lockstep"] = r["agent_steps_per_s"] / base
        print(f"{r['config']:44s} {r['agent_steps_per_s']:9.1f} {r['speedup_vs_lockstep']:7.2f} "
              f"{r['wait_plan_s']:12.1f} {r['env_s']:7.1f} {r['same_actions_as_baseline']}")
    print(json.dumps({"backend": jax.default_backend(), "devices": len(devices), "problems": n,
                      "steps": FLAGS.steps, "rows": rows}))


if __name__ == "__main__":
    app.run(main)
