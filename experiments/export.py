"""Export a checkpoint's policy prior and MPPI planner to ONNX (fp32, fp16, int8) for JAX-free deployment.

  python experiments/export.py --checkpoint=PATH --output=DIR [--task=NAME] [--precisions=fp32,fp16,int8] \
      [--int8=dynamic|static] [--calib_data=DATASET | --calib_episodes=1] [--mpc=true] [--num_samples=512 ...]
DIR/policy.<precision>.onnx: obs (B, O) [, task (B,)] -> action (B, A), the policy prior in eval mode;
DIR/mppi.<precision>.onnx: one MPPI action, every random number an input (see tdmpc_jax/export.py);
DIR/manifest.json: config, planner settings, noise shapes, file sizes and the measured parity checks.
Without --task the graphs are multi-task (task id input); --task=NAME writes that task's slice, its task
embedding folded in. Run them with `tdmpc_jax_runtime.OnnxAgent` (numpy + onnxruntime, no JAX), or score
them with `experiments/evaluate.py --runtime=onnx --onnx_dir=DIR`. Needs the export extra:
pip install -e '.[export]'.
"""
import os

from absl import flags

from tdmpc_jax import cli

PRECISIONS = ("fp32", "fp16", "int8")  # tdmpc_jax.export.PRECISIONS (not imported here: onnx is an extra)

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "official .pt or tdmpc_jax Orbax directory", required=True)
flags.DEFINE_string("output", None, "directory to write (replaced as a whole)", required=True)
flags.DEFINE_string("task", None, "export this task's single-task slice (default: multi-task graphs)")
flags.DEFINE_list("precisions", list(PRECISIONS), "variants to write (fp32 always)")
flags.DEFINE_enum("int8", "dynamic", ["dynamic", "static"],
                  "int8 activations: quantized per call (dynamic) or with calibrated ranges (static QDQ)")
flags.DEFINE_bool("mpc", True, "also export the MPPI planner (false: the policy prior only)")
flags.DEFINE_integer("iterations", 6, "MPPI iterations")
flags.DEFINE_integer("num_samples", 512, "MPPI samples")
flags.DEFINE_integer("num_elites", 64, "MPPI elites")
flags.DEFINE_integer("num_pi_trajs", 24, "policy trajectories among the samples")
flags.DEFINE_integer("horizon", 3, "planning horizon")
flags.DEFINE_string("calib_data", None, "dataset of real observations (e.g. collected with the teacher) for "
                                        "int8 calibration and the error checks")
flags.DEFINE_integer("calib_episodes", 1, "without --calib_data: policy-prior episodes per task collected with "
                                          "the checkpoint for calibration (0: standard normal observations)")
flags.DEFINE_integer("calib_obs", 512, "observations drawn from the calibration data")
flags.DEFINE_integer("seed", 1, "seed of the calibration episodes")
flags.DEFINE_bool("check", True, "measure the fp32 graphs against the JAX policy and planner")
cli.existing_path("checkpoint")
cli.output("output", "onnx-export")
cli.task_list("task", sets=False, single=True)
cli.choices("precisions", known=PRECISIONS, noun="precision")
cli.positive_int("iterations", "num_samples", "num_elites", "horizon", "calib_obs")
cli.non_negative_int("num_pi_trajs", "calib_episodes")
cli.dataset_dir("calib_data")
cli.seed("seed")


def _check_request(v):
    if "fp32" not in (v["precisions"] or ()):
        raise ValueError(f"--precisions={','.join(v['precisions'] or [])}: must include fp32 (the others derive "
                         "from it)")
    if v["num_elites"] > v["num_samples"]:
        raise ValueError(f"--num_elites={v['num_elites']}: must be <= --num_samples={v['num_samples']}")
    if v["num_pi_trajs"] >= v["num_samples"]:
        raise ValueError(f"--num_pi_trajs={v['num_pi_trajs']}: must be < --num_samples={v['num_samples']}")


cli.check(("precisions", "num_elites", "num_samples", "num_pi_trajs"), _check_request)


def main(argv):
    del argv
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the ONNX export needs the export extra ({e.name} is missing): "
                           "pip install -e '.[export]'") from None
    import shutil
    import tempfile

    import tdmpc_jax
    from tdmpc_jax import export
    from tdmpc_jax.data import Dataset
    from tdmpc_jax.planner import PlannerConfig

    agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
    cfg = agent.config
    if FLAGS.task is not None:
        if not cfg.multitask:
            raise ValueError(f"--task={FLAGS.task}: the checkpoint is single-task (export it without --task)")
        cfg.task_index(FLAGS.task)  # ValueError: not among the checkpoint's tasks
    pcfg = PlannerConfig(horizon=FLAGS.horizon, iterations=FLAGS.iterations, num_samples=FLAGS.num_samples,
                         num_elites=FLAGS.num_elites, num_pi_trajs=FLAGS.num_pi_trajs)
    calibration, source = None, ""
    if FLAGS.calib_data:
        ds = Dataset(FLAGS.calib_data)
        calibration = export.calibration_from_dataset(ds, cfg, FLAGS.calib_obs, FLAGS.seed)
        source = f"dataset {FLAGS.calib_data}"
    elif FLAGS.calib_episodes and cfg.multitask:
        from tdmpc_jax.data.collect import collect
        from tdmpc_jax.evaluation import check_dims, resolve_tasks
        tasks = [FLAGS.task] if FLAGS.task else [t for t in cfg.tasks if not t.startswith("mw-")]
        check_dims(agent, resolve_tasks(agent, tasks))
        print(f"collecting {FLAGS.calib_episodes} policy-prior episode(s) on {len(tasks)} task(s) for calibration ...",
              flush=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-calib-")
        try:
            ds = collect(agent, tasks, FLAGS.calib_episodes, os.path.join(tmp, "data"), PlannerConfig(mpc=False),
                         FLAGS.seed, eval_mode=False, progress=False)
            calibration = export.calibration_from_dataset(ds, cfg, FLAGS.calib_obs, FLAGS.seed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        source = f"{FLAGS.calib_episodes} episode(s)/task of the checkpoint's policy prior (seed {FLAGS.seed})"
    print(f"exporting {'task ' + FLAGS.task if FLAGS.task else 'all tasks'} to {FLAGS.output} ...", flush=True)
    m = export.export_agent(agent, FLAGS.output, task=FLAGS.task, pcfg=pcfg, mpc=FLAGS.mpc,
                            precisions=FLAGS.precisions, int8_mode=FLAGS.int8, calibration=calibration,
                            calibration_source=source, check=FLAGS.check,
                            log=lambda s: print(s, flush=True))
    for f, b in m["bytes"].items():
        print(f"  {f:22s} {b / 1e6:8.2f} MB")
    for k, v in m["checks"].items():
        print(f"  {k:40s} {v:.3g}")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
