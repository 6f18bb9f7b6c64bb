"""The training update of the MT30 1M student (batch 256) against its roofline; with teachers (5M, 317M).

  python benchmarks/train_step.py [--cores=1] [--teachers=5,317] [--batch=256] [--rounds=6]

Run once per core count (the pinning happens before JAX starts). The no-teacher update is timed in
`rounds` interleaved rounds together with, from the same run:
* the fp32 matmul peak (`common.matmul_peak_gflops`'s 1024^3 matmul), the roofline's denominator;
* the plain update (`make_update(fused=False)`: task embedding concatenated to every first layer,
  full first-layer gradients; the same math), the baseline of the fused default.
It prints ms/update (best of all rounds, and the median), the step's FLOPs from XLA's cost analysis
of the compiled step (`jit(...).lower(...).compile().cost_analysis()`), and
x roofline = time / (FLOPs / peak), for the compiled FLOPs and for the plain computation's FLOPs
(what the official code computes; the planner's figures use that convention). Each figure is given
on the wall clock and on this process's CPU time: on a core shared with other work the wall clock
of a 150 ms update is inflated more than that of a 20 ms matmul. With a GPU the update is measured
there as well (single steps and `make_train_steps` blocks, against that GPU's fp32 matmul peak);
without one the GPU line says pending. The teacher rows are ms/update and peak RSS.
"""
import json
import os
import resource
import sys
import time

from absl import app, flags

flags.DEFINE_integer("cores", 1, "CPU cores (pinned before JAX starts)")
flags.DEFINE_list("teachers", ["5", "317"], "teacher model sizes (MT30 shapes, random weights)")
flags.DEFINE_integer("batch", 256, "batch size")
flags.DEFINE_integer("repeats", 10, "timed updates per teacher row")
flags.DEFINE_integer("rounds", 6, "interleaved rounds (3 peak matmuls, 3 fused and 3 plain updates each)")
flags.DEFINE_integer("gpu_block", 16, "updates per jitted call in the GPU block measurement")
flags.DEFINE_bool("gpu_path_on_cpu", False, "run the GPU measurement code on the CPU (checks the code path only)")
FLAGS = flags.FLAGS


def _timed(fn, *args):
    """(wall seconds, CPU seconds of this process) of one call, outputs blocked on."""
    import jax
    w, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return (time.perf_counter() - w, time.process_time() - c), out


def _stats(ts):
    import numpy as np
    ts = np.asarray(ts)
    return {"best_s": ts.min(0).tolist(), "median_s": np.median(ts, 0).tolist()}  # [wall, cpu]


def _gpus():
    import jax
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def main(_):
    from benchmarks.common import pin_cores
    pin_cores(FLAGS.cores)
    import jax
    import numpy as np

    from benchmarks.common import matmul_peak_gflops, time_call
    from tdmpc_jax import host_memory, networks, train
    from tdmpc_jax.config import TrainConfig, make_model_config
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tdmpc_jax.losses import Batch

    cfg = make_model_config(1, "mt30")
    rng = np.random.RandomState(0)
    B, H = FLAGS.batch, 3
    host_batch = Batch(rng.randn(H + 1, B, 24).astype(np.float32), rng.uniform(-1, 1, (H, B, 6)).astype(np.float32),
                       rng.uniform(0, 2, (H, B)).astype(np.float32), rng.randint(0, 30, B).astype(np.int32))
    cpu = jax.devices("cpu")[:1]
    mesh = train.make_mesh(cpu)
    batch = Batch(*(jax.device_put(x, cpu[0]) for x in host_batch))
    tcfg = TrainConfig(batch_size=B)
    tuned = host_memory.keep_freed_memory()  # as make_train_step does
    results = {"cores": FLAGS.cores, "batch": B, "jax": jax.__version__, "malloc_tuning": tuned}
    print(f"jax {jax.__version__}, {FLAGS.cores} core(s), batch {B}, MT30 1M student; glibc keeps freed blocks: "
          f"{'yes' if tuned else 'no'}", flush=True)

    # --- the update vs the roofline, interleaved with the peak and the plain update -------------
    def compiled(fused):
        fn = (train._jitted_update(cfg, tcfg, None, mesh) if fused
              else jax.jit(train.make_update(cfg, tcfg, fused=False), donate_argnums=(0,)))
        state = jax.device_put(train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0)), cpu[0])
        c = fn.lower(state, batch, jax.random.PRNGKey(0), None).compile()
        return c, state, c.cost_analysis()["flops"]
    steps = {"fused": compiled(True), "plain": compiled(False)}
    n = 1024
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n)), cpu[0])
    mm = jax.jit(lambda x, y: x @ y)
    times = {"peak": [], "fused": [], "plain": []}
    states = {k: v[1] for k, v in steps.items()}
    for k, (c, _, _) in steps.items():  # warm up
        for i in range(2):
            states[k], _ = c(states[k], batch, jax.random.PRNGKey(i), None)
    jax.block_until_ready(mm(a, a))
    faults = {"fused": [], "plain": []}
    for r in range(FLAGS.rounds):
        for _ in range(3):
            times["peak"].append(_timed(mm, a, a)[0])
        for k, (c, _, _) in steps.items():
            for i in range(3):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t, (states[k], _) = _timed(c, states[k], batch, jax.random.PRNGKey(i), None)
                faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                times[k].append(t)
    st = {k: _stats(v) for k, v in times.items()}
    peak = [2 * n ** 3 / s / 1e9 for s in st["peak"]["best_s"]]  # [wall, cpu]
    flops, plain_flops = steps["fused"][2], steps["plain"][2]
    results["matmul_peak_gflops"] = {"wall": peak[0], "cpu": peak[1]}
    results["flops"] = {"fused": flops, "plain": plain_flops}
    print(f"fp32 matmul peak (same run): {peak[0]:.1f} GFLOP/s wall, {peak[1]:.1f} GFLOP/s CPU time", flush=True)
    print(f"FLOPs (XLA cost analysis of the compiled step): {flops / 1e9:.2f} GFLOP fused, "
          f"{plain_flops / 1e9:.2f} GFLOP plain", flush=True)
    for k in ("fused", "plain"):
        best, med = st[k]["best_s"], st[k]["median_s"]
        r = {"ms_per_update": best[0] * 1e3, "median_ms": med[0] * 1e3, "cpu_ms_per_update": best[1] * 1e3,
             "cpu_median_ms": med[1] * 1e3, "flops": steps[k][2],
             "page_faults_per_update_median": float(np.median(faults[k]))}
        for j, clk in enumerate(("wall", "cpu")):
            r[f"x_roofline_{clk}"] = best[j] / (steps[k][2] / (peak[j] * 1e9))
            r[f"x_roofline_plain_flops_{clk}"] = best[j] / (plain_flops / (peak[j] * 1e9))
        results[f"update_{k}"] = r
        label = "update (fused, default)" if k == "fused" else "baseline: plain update"
        print(f"  {label:24s} {r['ms_per_update']:7.1f} ms/update (median {r['median_ms']:.1f}) = "
              f"{r['x_roofline_wall']:.2f}x roofline ({r['x_roofline_plain_flops_wall']:.2f}x of the plain FLOPs) | "
              f"CPU time {r['cpu_ms_per_update']:.1f} ms = {r['x_roofline_cpu']:.2f}x "
              f"({r['x_roofline_plain_flops_cpu']:.2f}x); {r['page_faults_per_update_median']:.0f} page faults/update",
              flush=True)
    f, p = results["update_fused"], results["update_plain"]
    print(f"  fused / plain: {f['ms_per_update'] / p['ms_per_update']:.3f} wall, "
          f"{f['cpu_ms_per_update'] / p['cpu_ms_per_update']:.3f} CPU time", flush=True)
    print(f"ONE CORE: {f['ms_per_update']:.1f} ms/update = {f['x_roofline_wall']:.2f}x roofline "
          f"({flops / 1e9:.2f} GFLOP / {peak[0]:.1f} GFLOP/s); CPU time {f['cpu_ms_per_update']:.1f} ms = "
          f"{f['x_roofline_cpu']:.2f}x", flush=True)

    # --- the same on a GPU, when there is one ------------------------------------------------------
    gpus = cpu if FLAGS.gpu_path_on_cpu else _gpus()
    if not gpus:
        results["gpu"] = "pending: no GPU on this machine"
        print("GPU: pending (no GPU on this machine; rerun `make bench` where jax.devices('gpu') is not empty)",
              flush=True)
    else:
        gmesh = train.make_mesh(gpus[:1])
        grep = NamedSharding(gmesh, P())
        gbatch = Batch(*(jax.device_put(x, s) for x, s in zip(host_batch, train.batch_sharding(gmesh))))
        gstate = jax.device_put(train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0)), grep)
        key0 = jax.device_put(jax.random.PRNGKey(0), grep)
        gflops = train._jitted_update(cfg, tcfg, None, gmesh).lower(
            gstate, gbatch, key0, None).compile().cost_analysis()["flops"]
        gstep = train.make_train_step(cfg, tcfg, None, gmesh)

        def one(k):
            nonlocal gstate
            gstate, m = gstep(gstate, gbatch, k)
            return m["total_loss"]
        g1, _ = time_call(one, key0, repeats=20)
        K = FLAGS.gpu_block
        gsteps = train.make_train_steps(cfg, tcfg, None, gmesh, block=K)
        stacked = Batch(*(jax.device_put(np.stack([x] * K), s)
                          for x, s in zip(host_batch, train.batch_sharding(gmesh, block=True))))
        keys = jax.device_put(jax.random.split(jax.random.PRNGKey(1), K), grep)

        def blk(k):
            nonlocal gstate
            gstate, m = gsteps(gstate, stacked, k)
            return m["total_loss"]
        gk, _ = time_call(blk, keys, repeats=10)
        gpeak = matmul_peak_gflops(n=1024 if FLAGS.gpu_path_on_cpu else 8192, device=gpus[0])
        roof = gflops / (gpeak * 1e9)
        results["gpu"] = {"device": str(gpus[0]), "matmul_peak_gflops": gpeak, "flops": gflops,
                          "ms_per_update": g1 * 1e3, "x_roofline": g1 / roof,
                          f"ms_per_update_block{K}": gk / K * 1e3, f"x_roofline_block{K}": gk / K / roof}
        print(f"GPU ({gpus[0].device_kind}): {g1 * 1e3:.2f} ms/update = {g1 / roof:.1f}x roofline, "
              f"{gk / K * 1e3:.2f} ms/update in blocks of {K} = {gk / K / roof:.1f}x "
              f"({gflops / 1e9:.2f} GFLOP / {gpeak / 1e3:.1f} TFLOP/s fp32 matmul peak, same run)", flush=True)

    # --- teacher overheads ----------------------------------------------------------------------
    for teacher in [int(t) for t in FLAGS.teachers]:
        tc = TrainConfig(batch_size=B, distill_coef=0.4)
        t_cfg = make_model_config(teacher, "mt30")
        t_params = jax.device_put(networks.init_params(t_cfg, jax.random.PRNGKey(1))[0], cpu[0])
        step = train.make_train_step(cfg, tc, t_cfg, mesh)
        state = jax.device_put(train.init_train_state(cfg, tc, jax.random.PRNGKey(0)), cpu[0])

        def run(k):
            nonlocal state
            state, m = step(state, batch, k, t_params)
            return m["total_loss"]
        for i in range(2):
            run(jax.random.PRNGKey(i))
        tt = _stats([_timed(run, jax.random.PRNGKey(i))[0] for i in range(FLAGS.repeats)])
        (best, cbest), (med, _) = tt["best_s"], tt["median_s"]
        name = f"teacher_{teacher}M"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results[name] = {"ms_per_update": best * 1e3, "median_ms": med * 1e3, "cpu_ms_per_update": cbest * 1e3,
                         "updates_per_s": 1 / best, "peak_rss_mb_so_far": rss}
        print(f"  {name:16s} {best * 1e3:8.1f} ms/update (median {med * 1e3:.1f}; CPU time {cbest * 1e3:.1f})  "
              f"{1 / best:6.2f} updates/s  peak RSS {rss:.0f} MB", flush=True)
        del t_params
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
