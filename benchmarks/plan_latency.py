"""MPPI planning latency vs the fp32 roofline, for the MT30 1M and 5M shapes.

  python benchmarks/plan_latency.py [--cores=1] [--batch=300] [--sizes=1,5] [--chunks=0,4] [--compute=bf16]
Per size: ms per action for one problem (MPPI and policy prior), actions/s for a batch of `batch`
problems with each of `chunks` (PlannerConfig.chunk; 0 = the backend's default, the first is the
baseline of the ratios), the same for each reduced `compute` mode against fp32, and all as multiples of the roofline (FLOPs of the plain official computation / the fp32
matmul peak measured in this run). Writes a JSON line at the end.
"""
import dataclasses
import json
import sys

from absl import app, flags

flags.DEFINE_integer("cores", 1, "CPU cores to use (pinned before JAX starts)")
flags.DEFINE_integer("batch", 300, "problems in the batched measurement (0 skips it)")
flags.DEFINE_list("sizes", ["1", "5"], "MT30 model sizes")
flags.DEFINE_list("chunks", ["0"], "PlannerConfig.chunk values for the batched measurement (0: backend default)")
flags.DEFINE_list("compute", [], "other compute modes (bf16: quantize.for_compute) timed for one problem against "
                  "the fp32 roofline and the same run's fp32 time")
flags.register_validator("compute", lambda v: set(v) <= {"bf16"}, "--compute: only bf16 (fp32 is always measured)")
flags.DEFINE_integer("repeats", 10, "timed repeats")
FLAGS = flags.FLAGS


def main(_):
    from benchmarks.common import pin_cores
    pin_cores(FLAGS.cores)
    import jax
    import jax.numpy as jnp

    from benchmarks.common import matmul_peak_gflops, plain_plan_flops, time_call
    from tdmpc_jax import networks, planner, quantize
    from tdmpc_jax.config import make_model_config

    peak = matmul_peak_gflops()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {FLAGS.cores} core(s); fp32 matmul peak {peak:.1f} GFLOP/s", flush=True)
    results = {"cores": FLAGS.cores, "matmul_peak_gflops": peak, "sizes": {}}
    pcfg = planner.PlannerConfig()
    for size in map(int, FLAGS.sizes):
        cfg = make_model_config(size, "mt30")
        params, _ = networks.init_params(cfg, jax.random.PRNGKey(0))
        # non-trivial heads so the work is representative
        params = jax.tree_util.tree_map(lambda x: x + 0.01, params)
        flops = plain_plan_flops(cfg, pcfg)
        roof_ms = flops / peak / 1e6
        obs = jax.random.normal(jax.random.PRNGKey(1), (cfg.obs_dim,))
        st = planner.init_state(cfg, pcfg)
        one = lambda k: planner.act_one(cfg, pcfg, params, obs, jnp.int32(3), st, jnp.bool_(False), k)
        best, med = time_call(one, jax.random.PRNGKey(2), repeats=FLAGS.repeats)
        pol = planner.PlannerConfig(mpc=False)
        pbest, _ = time_call(lambda k: planner.act_one(cfg, pol, params, obs, jnp.int32(3), st,
                                                       jnp.bool_(False), k), jax.random.PRNGKey(2), repeats=50)
        r = {"plain_gflop_per_action": flops / 1e9, "roofline_ms": roof_ms, "mppi_ms": best * 1e3,
             "mppi_ms_median": med * 1e3, "mppi_x_roofline": best * 1e3 / roof_ms,
             "policy_prior_ms": pbest * 1e3}
        print(f"MT30-{size}M: {flops / 1e9:.2f} GFLOP/action (plain), roofline {roof_ms:.1f} ms | "
              f"MPPI {best * 1e3:.1f} ms (median {med * 1e3:.1f}) = {r['mppi_x_roofline']:.2f}x roofline | "
              f"policy prior {pbest * 1e3:.3f} ms", flush=True)
        reduced = {mode: quantize.for_compute(params, mode) for mode in FLAGS.compute}
        for mode, mp in reduced.items():
            mbest, _ = time_call(lambda k: planner.act_one(cfg, pcfg, mp, obs, jnp.int32(3), st, jnp.bool_(False), k),
                                 jax.random.PRNGKey(2), repeats=FLAGS.repeats)
            r.setdefault("compute_modes", {})[mode] = {"mppi_ms": mbest * 1e3, "x_fp32_roofline": mbest * 1e3 / roof_ms,
                                                      "x_fp32": mbest / best}
            print(f"  compute {mode}: MPPI {mbest * 1e3:.1f} ms = {mbest * 1e3 / roof_ms:.2f}x the fp32 roofline, "
                  f"{mbest / best:.2f}x fp32 in this run", flush=True)
        if FLAGS.batch:
            B = FLAGS.batch
            obs_b = jax.random.normal(jax.random.PRNGKey(3), (B, cfg.obs_dim))
            task_b = jnp.arange(B, dtype=jnp.int32) % cfg.num_tasks
            st_b = planner.init_state(cfg, pcfg, B)
            t0 = jnp.zeros((B,), bool)
            for i, chunk in enumerate(map(int, FLAGS.chunks)):
                pc = dataclasses.replace(pcfg, chunk=chunk)
                fb = lambda k: planner.act_batch(cfg, pc, params, obs_b, task_b, st_b, t0, k)
                bbest, _ = time_call(fb, jax.random.PRNGKey(4), repeats=max(2, FLAGS.repeats // 5), warmup=1)
                used = pc.chunk_for(B, jax.default_backend())
                b = {"batch": B, "chunk": used, "batch_actions_per_s": B / bbest,
                     "batch_fraction_of_peak": B * flops / bbest / 1e9 / peak}
                if i == 0:
                    r.update(b)
                    base = B / bbest
                else:
                    r.setdefault("other_chunks", []).append(b)
                print(f"  batch {B}, chunk {used}: {B / bbest:.1f} actions/s ({B / bbest / base:.2f}x the first), "
                      f"{b['batch_fraction_of_peak']:.0%} of the matmul peak (plain FLOPs)", flush=True)
            pc = dataclasses.replace(pcfg, chunk=int(FLAGS.chunks[0]))
            for mode, mp in reduced.items():
                bbest, _ = time_call(lambda k: planner.act_batch(cfg, pc, mp, obs_b, task_b, st_b, t0, k),
                                     jax.random.PRNGKey(4), repeats=max(2, FLAGS.repeats // 5), warmup=1)
                frac = B * flops / bbest / 1e9 / peak
                r["compute_modes"][mode].update(batch_actions_per_s=B / bbest, batch_fraction_of_fp32_peak=frac)
                print(f"  batch {B}, compute {mode}: {B / bbest:.1f} actions/s ({B / bbest / base:.2f}x fp32), "
                      f"{frac:.0%} of the fp32 matmul peak (plain FLOPs)", flush=True)
        results["sizes"][size] = r
    print(json.dumps(results))


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
