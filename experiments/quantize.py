"""Write fp16 / bf16 / int8 / mixed variants of a checkpoint and a report of what each costs.

  python experiments/quantize.py --checkpoint=PATH --formats=fp16,bf16,int8,mixed --output=DIR \
      [--evaluate --tasks=... --episodes=10 --mpc=false] [--extra=other.pt,...]
DIR/<format>/ holds each variant (Orbax; `load_checkpoint` reads it), DIR/report.{md,json,png} the
comparison against fp32: size, output errors on real observations, MPPI latency, and scores.
The formats (choices, default and help of --formats) are those registered in tdmpc_jax.quantize.FORMATS;
a new format is added there, nothing here changes.
"""
import os

from absl import flags

from tdmpc_jax import cli, quantize

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "official .pt or tdmpc_jax Orbax directory", required=True)
flags.DEFINE_list("formats", [n for n in quantize.FORMATS if n != "fp32"],
                  "formats to write besides fp32: " + "; ".join(f"{f.name}: {f.help} (~{f.bytes_per_param:g} B/weight)"
                                                             for f in quantize.FORMATS.values()))
flags.DEFINE_string("output", None, "output directory", required=True)
flags.DEFINE_bool("evaluate", False, "also evaluate every variant")
flags.DEFINE_string("tasks", None, "tasks to evaluate (default: the checkpoint's task set)")
flags.DEFINE_integer("episodes", 10, "episodes per task with --evaluate")
flags.DEFINE_bool("mpc", False, "evaluate with MPPI (default: the policy prior, 100x cheaper)")
flags.DEFINE_integer("seed", 1, "seed for observations and evaluation")
flags.DEFINE_integer("calib_steps", 50, "policy-prior steps per task for the observation set")
flags.DEFINE_float("mixed_share", 0.5, "mixed (any format using sensitivity) keeps fp16 kernels covering this "
                   "share of int8 error")
flags.DEFINE_enum("compute", "fp32", ["fp32", "bf16"], "compute mode of the loaded variants")
flags.DEFINE_list("extra", [], "other checkpoints of the same architecture to put in the table")
flags.DEFINE_bool("latency", True, "measure MPPI latency per compute mode")
cli.existing_path("checkpoint", "extra")


cli.choices("formats", known=lambda: tuple(quantize.FORMATS), noun="format")  # the registry at parse time
cli.output("output", "quantize")
cli.task_list("tasks")
cli.positive_int("episodes", "calib_steps")
cli.seed("seed")
cli.finite_float("mixed_share", lo=0, hi=1)


def _check_variants(v):
    """OUT/<format>/ is replaced by each variant: it must be new, empty or a checkpoint of ours."""
    from tdmpc_jax.results_io import check_output
    for fmt in ["fp32"] + list(v["formats"] or []):
        try:
            check_output(os.path.join(v["output"], fmt), "checkpoint", v["overwrite"])
        except ValueError as e:
            raise ValueError(f"--output={v['output']}: {fmt}: {getattr(e, 'problem', e)}") from None


cli.check(("output", "overwrite", "formats"), _check_variants)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    import tdmpc_jax
    from tdmpc_jax import quant_report as qr
    from tdmpc_jax.evaluation import check_dims, evaluate, resolve_tasks
    from tdmpc_jax.planner import PlannerConfig
    from tdmpc_jax.results_io import claim_output

    agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
    cfg = agent.config
    if not cfg.multitask:
        raise ValueError("the report needs a multi-task checkpoint (its task set gives the observations)")
    calib_tasks = resolve_tasks(agent, FLAGS.tasks or cfg.task_set or ",".join(cfg.tasks))
    check_dims(agent, calib_tasks)
    extras = {os.path.basename(p): tdmpc_jax.load_checkpoint(p) for p in FLAGS.extra}
    for name, e in extras.items():
        if e.config != cfg:
            raise ValueError(f"--extra {name}: architecture differs from the checkpoint's")
    claim_output(FLAGS.output, "quantize", FLAGS.overwrite)
    print(f"collecting observations on {len(calib_tasks)} tasks ...", flush=True)
    obs, task, action = qr.collect_observations(agent, calib_tasks, FLAGS.calib_steps, FLAGS.seed)
    keep = []
    if qr.needs_sensitivity(FLAGS.formats):
        print("measuring per-kernel int8 sensitivity ...", flush=True)
        keep, sens = qr.choose_mixed(agent, obs, task, action, FLAGS.mixed_share)
    ref = qr.model_outputs(cfg, jax.tree_util.tree_map(jnp.asarray, agent.params), obs, task, action)
    report = {"checkpoint": FLAGS.checkpoint, "tasks": calib_tasks, "num_observations": int(len(obs)),
              "compute": FLAGS.compute, "mixed_fp16_kernels": ["/".join(k) for k in keep], "variants": {}}
    variants = {}
    for fmt in ["fp32"] + [f for f in FLAGS.formats if f != "fp32"]:
        d = agent.save(os.path.join(FLAGS.output, fmt), fmt=fmt,
                       keep_fp16=keep if quantize.get_format(fmt).uses_sensitivity else ())
        variants[fmt] = (tdmpc_jax.load_checkpoint(d, compute=FLAGS.compute), d)
    for name, e in extras.items():
        variants[name] = (e, None)
    pcfg = PlannerConfig(mpc=FLAGS.mpc)
    for name, (v, d) in variants.items():
        params = jax.tree_util.tree_map(jnp.asarray, v.params)
        got = qr.model_outputs(cfg, params, obs, task, action)
        row = {"errors": qr.output_errors(ref, got),
               **(qr.storage_size(agent.params, name, keep) if d else
                  {"param_bytes": os.path.getsize(v.metadata["source"])}),
               "disk_bytes": qr.dir_bytes(d) if d else os.path.getsize(v.metadata["source"])}
        if FLAGS.evaluate:
            row["eval"] = evaluate(v, calib_tasks, FLAGS.episodes, FLAGS.seed, pcfg, progress=False)
            print(f"  {name}: normalized score {row['eval']['normalized_score']:.2f}", flush=True)
        report["variants"][name] = row
    if FLAGS.latency:
        modes = {"fp32": jax.tree_util.tree_map(jnp.asarray, agent.params),
                 "bf16": quantize.for_compute(agent.params, "bf16")}
        report["compute_modes"] = {m: qr.plan_latency_ms(cfg, p) for m, p in modes.items()}
        for name in report["variants"]:
            report["variants"][name]["plan_ms"] = report["compute_modes"][FLAGS.compute]
    qr.write_report(FLAGS.output, report)
    print(open(os.path.join(FLAGS.output, "report.md")).read())


if __name__ == "__main__":
    cli.run(main)
