"""Evaluate a checkpoint on MT30 tasks, every episode batched; or compare earlier evaluations.

  python experiments/evaluate.py --checkpoint=PATH --tasks=mt30 --episodes=10 --seed=1 \
      --mpc=true --eval_mode=true --output=DIR
  python experiments/evaluate.py --compare=DIR1,DIR2 --output=DIR
  python experiments/evaluate.py --runtime=onnx --onnx_dir=EXPORT --precision=int8 --mpc=false --output=DIR
(--runtime=onnx scores an experiments/export.py directory with onnxruntime, no JAX in the acting path;
its planner settings are the export's.)
Writes DIR/results.json, DIR/results.csv (and DIR/compare.png with --compare). --resume keeps finished
groups of episodes in DIR/partial/: a killed evaluation run again plays only what is missing.
"""
import json
import os

from absl import flags

from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "official .pt or tdmpc_jax Orbax directory")
flags.DEFINE_string("tasks", "mt30", "mt30, mt80, or a comma-separated list of task names")
flags.DEFINE_integer("episodes", 10, "episodes per task")
flags.DEFINE_integer("seed", 1, "environment seed (random=seed) and planner PRNG seed")
flags.DEFINE_bool("mpc", True, "plan with MPPI (false: act with the policy prior)")
flags.DEFINE_bool("eval_mode", True, "no exploration noise (the official evaluate.py used false)")
flags.DEFINE_integer("iterations", 6, "MPPI iterations")
flags.DEFINE_integer("num_samples", 512, "MPPI samples")
flags.DEFINE_integer("num_elites", 64, "MPPI elites")
flags.DEFINE_integer("num_pi_trajs", 24, "policy trajectories among the samples")
flags.DEFINE_integer("horizon", 3, "planning horizon")
flags.DEFINE_integer("workers", -1, "environment worker processes (0: step in this process; -1: the backend's "
                     "default, every core but two on an accelerator, 0 on a CPU, whose cores plan)")
flags.DEFINE_integer("chunk", 0, "MPPI problems planned together per vmapped chunk (0: the backend's default, "
                     "4 on a CPU, all problems on an accelerator); results do not depend on it")
flags.DEFINE_integer("parts", 0, "overlap planning with environment stepping: plan one of PARTS groups of the "
                     "problems while the previous group's environments step (same returns; pays with --workers "
                     "on an accelerator; 0: 2 with env workers, else 1)")
flags.DEFINE_integer("devices", 1, "split the problems over this many local devices (0: all; same returns)")
flags.DEFINE_enum("compute", "fp32", ["fp32", "bf16"], "compute mode: fp32, or bf16 kernels and matmuls with fp32 "
                  "accumulation (faster on CPUs with AVX512-BF16 and on accelerators; scores within a measured "
                  "tolerance, README)")
flags.DEFINE_bool("resume", False, "play the episodes in groups of --group and keep each finished group in "
                  "OUTPUT/partial/; run the same command again after a kill and only the missing groups are "
                  "played (the same returns as one batch; partial results of another checkpoint or other "
                  "settings are refused)")
flags.DEFINE_integer("group", 16, "with --resume: episodes per group (rounded up to the planner's chunk)")
flags.DEFINE_list("compare", None, "result directories to plot side by side instead of evaluating")
flags.DEFINE_enum("runtime", "jax", ["jax", "onnx"], "act with the JAX planner or an exported ONNX agent")
flags.DEFINE_string("onnx_dir", None, "with --runtime=onnx: a directory written by experiments/export.py")
flags.DEFINE_enum("precision", "fp32", ["fp32", "fp16", "int8"], "with --runtime=onnx: which exported variant")
flags.DEFINE_string("output", None, "output directory", required=True)
cli.existing_path("checkpoint")
cli.existing_path("onnx_dir", kind="dir")
cli.task_list("tasks")
cli.positive_int("episodes", "iterations", "num_samples", "num_elites", "horizon", "group")
cli.non_negative_int("num_pi_trajs", "chunk", "devices")
cli.int_range("workers", lo=-1, hi=1024)
cli.int_range("parts", lo=0, hi=64)


def _check_devices(v):
    import jax
    have = jax.local_device_count()
    if v > have:
        raise ValueError(f"{v} devices requested, this process has {have} ({jax.default_backend()})")


cli.rule("devices", _check_devices)

cli.seed("seed")
cli.output("output", "eval")


def _check_compare(v):
    if v is None:
        return
    if not v:
        raise ValueError("empty list")
    from tdmpc_jax.results_io import read_results
    for d in v:
        read_results(d)  # a results.json of an evaluation (cheap)


def _check_request(v):
    if v["compare"] and (v["checkpoint"] or v["onnx_dir"]):
        raise ValueError("--compare: give either --checkpoint (evaluate) or --compare (plot earlier results)")
    if v["runtime"] == "onnx" and not v["compare"]:
        if v["checkpoint"]:
            raise ValueError(f"--checkpoint={v['checkpoint']}: --runtime=onnx evaluates --onnx_dir instead")
        if not v["onnx_dir"]:
            raise ValueError("--onnx_dir: is required with --runtime=onnx")
        if not os.path.isfile(os.path.join(v["onnx_dir"], "manifest.json")):
            raise ValueError(f"--onnx_dir={v['onnx_dir']}: not an ONNX export (no manifest.json)")
        if not v["eval_mode"]:
            raise ValueError("--eval_mode=false: exported agents act in eval mode only")
        if v["resume"]:
            raise ValueError("--resume: resumes the JAX planner's evaluation, not --runtime=onnx")
        return
    if v["onnx_dir"]:
        raise ValueError(f"--onnx_dir={v['onnx_dir']}: needs --runtime=onnx")
    if not v["compare"] and not v["checkpoint"]:
        raise ValueError("--checkpoint: is required (or use --compare)")
    if v["num_elites"] > v["num_samples"]:
        raise ValueError(f"--num_elites={v['num_elites']}: must be <= --num_samples={v['num_samples']}")
    if v["num_pi_trajs"] >= v["num_samples"]:
        raise ValueError(f"--num_pi_trajs={v['num_pi_trajs']}: must be < --num_samples={v['num_samples']}")


cli.rule("compare", _check_compare)
cli.check(("compare", "checkpoint", "num_elites", "num_samples", "num_pi_trajs", "runtime", "onnx_dir", "eval_mode",
           "resume"), _check_request)


def main(argv):
    del argv
    from tdmpc_jax.results_io import claim_output, read_results, write_results
    if FLAGS.compare:
        from tdmpc_jax.plots import compare_runs
        runs = {os.path.basename(os.path.normpath(d)) or d: read_results(d) for d in FLAGS.compare}
        claim_output(FLAGS.output, "eval", FLAGS.overwrite)
        png = compare_runs(runs, os.path.join(FLAGS.output, "compare.png"))
        print(json.dumps({k: round(v["normalized_score"], 3) for k, v in runs.items()} | {"plot": png}))
        return
    import tdmpc_jax
    from tdmpc_jax.evaluation import check_dims, evaluate, resolve_tasks
    from tdmpc_jax.planner import PlannerConfig
    actor = None
    if FLAGS.runtime == "onnx":
        agent, pcfg, actor = _onnx_actor()
    else:
        agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint, compute=FLAGS.compute)
        pcfg = PlannerConfig(horizon=FLAGS.horizon, iterations=FLAGS.iterations, num_samples=FLAGS.num_samples,
                             num_elites=FLAGS.num_elites, num_pi_trajs=FLAGS.num_pi_trajs, mpc=FLAGS.mpc,
                             chunk=FLAGS.chunk)
    check_dims(agent, resolve_tasks(agent, FLAGS.tasks))  # the tasks fit the checkpoint, before any episode
    claim_output(FLAGS.output, "eval", FLAGS.overwrite)
    import jax
    from tdmpc_jax.evaluation import default_parts, env_workers
    devices = jax.local_devices()[:FLAGS.devices or None] if actor is None else None
    workers = env_workers(FLAGS.workers)
    res = evaluate(agent, FLAGS.tasks, FLAGS.episodes, FLAGS.seed, pcfg, FLAGS.eval_mode, workers, actor=actor,
                   parts=FLAGS.parts or default_parts(workers), devices=devices,
                   resume_dir=FLAGS.output if FLAGS.resume else None, group=FLAGS.group)
    if actor is not None:
        res.update(runtime=f"onnx-{FLAGS.precision}", onnx_dir=FLAGS.onnx_dir)
    else:
        res.update(compute=FLAGS.compute)
    write_results(FLAGS.output, res)
    for t, v in res["tasks"].items():
        print(f"  {t:28s} return {v['mean']:8.1f} +- {v['std']:6.1f}   score {v['score']:6.2f}")
    lo, hi = res["normalized_score_ci95"]
    print(f"normalized score {res['normalized_score']:.2f} (95% CI {lo:.2f}-{hi:.2f}); "
          f"{res['wall_time_s']:.0f}s; results in {FLAGS.output}")


def _onnx_actor():
    """An exported agent as the evaluator's actor: (an Agent holding only its config, planner settings, actor)."""
    try:
        from tdmpc_jax_runtime import OnnxAgent
    except ImportError as e:
        raise RuntimeError(f"--runtime=onnx needs the export extra ({e.name} is missing): "
                           "pip install -e '.[export]'") from None
    from tdmpc_jax.agent import Agent
    from tdmpc_jax.config import ModelConfig
    from tdmpc_jax.evaluation import resolve_tasks
    from tdmpc_jax.planner import PlannerConfig
    from tdmpc_jax.rollout import host_actor
    runtime = OnnxAgent(FLAGS.onnx_dir, FLAGS.precision, mpc=FLAGS.mpc, seed=FLAGS.seed)
    m = runtime.manifest
    agent = Agent(ModelConfig.from_dict(m["config"]), {}, {}, {"source": FLAGS.onnx_dir})
    if m.get("task"):
        other = [t for t in resolve_tasks(agent, FLAGS.tasks) if t != m["task"]]
        if other:
            raise ValueError(f"--tasks={FLAGS.tasks}: {FLAGS.onnx_dir} is a single-task export of {m['task']!r}")
    if FLAGS.mpc and "mppi" not in m["graphs"]:
        raise ValueError(f"--onnx_dir={FLAGS.onnx_dir}: exported without the planner; use --mpc=false")
    kw = {k: v for k, v in m["planner"].items() if k in PlannerConfig.__dataclass_fields__}
    pcfg = PlannerConfig(**dict(kw, mpc=FLAGS.mpc))
    return agent, pcfg, host_actor(lambda obs, task, t0: runtime.act_batch(obs, task, t0, FLAGS.mpc))


if __name__ == "__main__":
    cli.run(main)
