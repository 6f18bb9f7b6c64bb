"""Per-action latency of the deployed agent on one core: JAX fp32 vs ONNX fp32 / fp16 / int8, with the roofline.

  python benchmarks/runtime_latency.py [--checkpoint=checkpoints/td-mpc-opt/mt30_1M_steps_045dist_fp16.pt]
      [--cores=1] [--repeats=20] [--task=3] [--output=FILE.json]
Policy prior (obs -> action) and one MPPI action (512 samples, 6 iterations, horizon 3) of the multi-task
graphs through the runtime class (MPPI: its numpy noise draws included); MPPI variants timed in interleaved
rounds (a shared core slows every variant alike), policy-prior variants one after the other; best and median
per action, in CPU time of this (pinned, single-threaded) process and in wall time. The roofline is the
FLOPs of the plain official MPPI computation over the fp32 matmul peak measured in this run with the same
clock (best of a measurement before and after), as in benchmarks/plan_latency.py.
Needs the export extra (pip install -e '.[export]').
"""
import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("checkpoint", os.path.join("checkpoints", "td-mpc-opt", "mt30_1M_steps_045dist_fp16.pt"),
                    "checkpoint to export and time")
flags.DEFINE_integer("cores", 1, "CPU cores to use (pinned before JAX starts)")
flags.DEFINE_integer("repeats", 20, "timed MPPI rounds (the policy prior gets 50x as many)")
flags.DEFINE_integer("task", 3, "task id of the timed problem")
flags.DEFINE_string("output", None, "also write the results to this JSON file")
flags.DEFINE_enum("clock", "cpu", ["cpu", "wall"], "clock of the printed table: this process's CPU time "
                  "(pinned, single-threaded: a core shared with other processes does not inflate it) or wall "
                  "time; the JSON has both")
FLAGS = flags.FLAGS


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _rounds(fns, repeats, warmup=2, interleave=True):
    """Time every fn `repeats` times, in interleaved rounds (or one fn after the other: calls of a few
    microseconds measured between others would time the others' cache footprint);
    -> {clock: {name: (best s, median s)}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {c: {k: [] for k in fns} for c in CLOCKS}
    order = [k for _ in range(repeats) for k in fns] if interleave else [k for k in fns for _ in range(repeats)]
    for k in order:
        fn = fns[k]
        t = {c: clock() for c, clock in CLOCKS.items()}
        fn()
        for c, clock in CLOCKS.items():
            times[c][k].append(clock() - t[c])
    return {c: {k: (min(v), sorted(v)[len(v) // 2]) for k, v in tc.items()} for c, tc in times.items()}


def _peak_gflops(n=1024, repeats=10):
    """The fp32 matmul peak (`benchmarks.common.matmul_peak_gflops`'s jitted n x n matmul), per clock."""
    import jax
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n))
    f = jax.jit(lambda x, y: x @ y)
    t = _rounds({"mm": lambda: jax.block_until_ready(f(a, b))}, repeats)
    return {c: 2 * n ** 3 / t[c]["mm"][0] / 1e9 for c in CLOCKS}


def main(_):
    from benchmarks.common import pin_cores
    pin_cores(FLAGS.cores)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onnxruntime as ort

    import tdmpc_jax
    from benchmarks.common import plain_plan_flops
    from tdmpc_jax import export, planner
    from tdmpc_jax_runtime import OnnxAgent

    peak0 = _peak_gflops()
    agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
    cfg = agent.config
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    pcfg = planner.PlannerConfig()
    task = FLAGS.task if cfg.multitask else 0
    out = os.path.join(tempfile.mkdtemp(prefix="runtime-latency-"), "export")
    print("exporting ...", flush=True)
    export.export_agent(agent, out, pcfg=pcfg, check=False, log=lambda s: None)
    runtimes = {p: OnnxAgent(out, p, threads=FLAGS.cores) for p in export.PRECISIONS}
    obs = np.random.default_rng(0).standard_normal(cfg.obs_dim).astype(np.float32)
    st = planner.init_state(cfg, pcfg)
    key = jax.random.PRNGKey(0)
    jobs, jtask = jnp.asarray(obs), jnp.int32(task)
    tid = task if cfg.multitask else None

    def jax_call(pc):
        return lambda: jax.block_until_ready(planner.act_one(cfg, pc, params, jobs, jtask, st, jnp.bool_(False), key))

    # the ONNX rows go through the runtime class, as deployed (MPPI: numpy noise draws included)
    pol = {"jax fp32": jax_call(planner.PlannerConfig(mpc=False))}
    pol.update({f"onnx {p}": (lambda r=r: r.policy(obs, tid)) for p, r in runtimes.items()})
    mppi = {"jax fp32": jax_call(pcfg)}
    mppi.update({f"onnx {p}": (lambda r=r: r.plan(obs, tid)) for p, r in runtimes.items()})
    print(f"timing on {FLAGS.cores} core(s): policy prior ...", flush=True)
    pol_t = _rounds(pol, FLAGS.repeats * 100, warmup=100, interleave=False)
    print("MPPI ...", flush=True)
    mppi_t = _rounds(mppi, FLAGS.repeats)
    peak1 = _peak_gflops()
    flops = plain_plan_flops(cfg, pcfg)
    res = {"checkpoint": FLAGS.checkpoint, "cores": FLAGS.cores, "jax": jax.__version__, "onnxruntime": ort.__version__,
           "plain_gflop_per_action": flops / 1e9,
           "file_mb": {f: os.path.getsize(os.path.join(out, f)) / 1e6 for f in sorted(os.listdir(out))
                       if f.endswith(".onnx")}}
    for c in CLOCKS:
        peak = max(peak0[c], peak1[c])  # the best of a measurement before and after: the stricter roofline
        roof_ms = flops / peak / 1e6
        res[c] = {"matmul_peak_gflops": peak, "roofline_ms": roof_ms,
                  "policy_ms": {k: {"best": b * 1e3, "median": m * 1e3} for k, (b, m) in pol_t[c].items()},
                  "mppi_ms": {k: {"best": b * 1e3, "median": m * 1e3, "x_roofline": b * 1e3 / roof_ms}
                              for k, (b, m) in mppi_t[c].items()}}
    r = res[FLAGS.clock]
    print(f"\n{FLAGS.clock} time; fp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; MPPI {flops / 1e9:.2f} "
          f"GFLOP/action (plain) -> roofline {r['roofline_ms']:.1f} ms\n")
    print("| runtime | policy prior ms (best / median) | MPPI ms (best / median) | MPPI x roofline |")
    print("|---|---|---|---|")
    for k in pol:
        p, m = r["policy_ms"][k], r["mppi_ms"][k]
        print(f"| {k} | {p['best']:.3f} / {p['median']:.3f} | {m['best']:.1f} / {m['median']:.1f} | "
              f"{m['x_roofline']:.2f} |")
    print(json.dumps(res))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(res, f, indent=1)
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
