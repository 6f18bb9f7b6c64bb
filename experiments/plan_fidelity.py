"""How faithfully a student's model ranks MPPI's candidate action sequences like its teacher's, on dataset
states and on the states the student's own MPPI visits (`tdmpc_jax.plan_fidelity`).

  python experiments/plan_fidelity.py --student=runs/distill/distilled/agent --data=runs/distill/data \
      --output=fidelity.json [--teacher=checkpoints/teacher-mt4 --tasks=pendulum-spin --states=150]
A student that ranks like its teacher on the data but not where it plans suffers covariate shift: the
teacher's labels are missing at the student's own states (docs/distillation.md).
"""
import os

from absl import flags

from tdmpc_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("student", None, "student checkpoint", required=True)
flags.DEFINE_string("teacher", os.path.join(REPO, "checkpoints", "teacher-mt4"), "teacher checkpoint")
flags.DEFINE_string("data", None, "dataset whose states are the 'data' set (the student's training data)",
                    required=True)
flags.DEFINE_string("output", None, "output .json", required=True)
flags.DEFINE_string("tasks", None, "tasks (default: the teacher's)")
flags.DEFINE_integer("states", 150, "states per task and set")
flags.DEFINE_integer("steps", 1000, "steps of the student's MPPI episode whose states are the 'visited' set")
flags.DEFINE_integer("candidates", 128, "MPPI-like action sequences per state")
flags.DEFINE_integer("iterations", 4, "MPPI iterations of the student's episode")
flags.DEFINE_integer("num_samples", 256, "MPPI samples of the student's episode")
flags.DEFINE_integer("seed", 1, "seed")
cli.existing_path("student", "teacher")
cli.dataset_dir("data")
cli.output("output", "plan-fidelity", extensions=(".json",))
cli.task_list("tasks")
cli.positive_int("states", "steps", "iterations")
cli.int_range("candidates", lo=2)
cli.int_range("num_samples", lo=16)
cli.seed("seed")


def main(argv):
    del argv
    import json

    import numpy as np

    import tdmpc_jax
    from tdmpc_jax import plan_fidelity
    from tdmpc_jax.data import Dataset
    from tdmpc_jax.evaluation import check_dims, resolve_tasks
    from tdmpc_jax.planner import PlannerConfig
    from tdmpc_jax import atomic
    from tdmpc_jax.results_io import check_output

    student, teacher = tdmpc_jax.load_checkpoint(FLAGS.student), tdmpc_jax.load_checkpoint(FLAGS.teacher)
    tasks = resolve_tasks(teacher, FLAGS.tasks or list(teacher.config.tasks))
    check_dims(student, tasks)
    for t in tasks:
        if student.config.task_index(t) != teacher.config.task_index(t):
            raise ValueError(f"--student={FLAGS.student}: task {t} has another index than in the teacher")
    ds = Dataset(FLAGS.data)
    ds.check_compatible(student.config, "student")
    obs, task_ids = np.asarray(ds.arrays["obs"]), np.asarray(ds.arrays["task"]).reshape(-1)
    rng = np.random.default_rng(FLAGS.seed)
    data_obs = {}
    for t in tasks:
        idx = np.flatnonzero(task_ids == (ds.tasks.index(t) if t in ds.tasks else -1))
        if not len(idx):
            raise ValueError(f"--data={FLAGS.data}: no transitions of task {t}")
        data_obs[t] = obs[rng.choice(idx, min(FLAGS.states, len(idx)), replace=False)]
    out = check_output(FLAGS.output, "plan-fidelity", FLAGS.overwrite)
    pcfg = PlannerConfig.scaled(FLAGS.iterations, FLAGS.num_samples)
    res = plan_fidelity.report(student, teacher, tasks, data_obs, pcfg, FLAGS.steps, FLAGS.seed, FLAGS.candidates)
    print("| task | corr on data (median) | corr visited (median) | regret data | regret visited | student MPPI return |")
    print("|---|---|---|---|---|---|")
    for t, r in res.items():
        print(f"| {t} | {r['data']['corr_median']:.2f} | {r['visited']['corr_median']:.2f} | "
              f"{r['data']['regret_median']:.2f} | {r['visited']['regret_median']:.2f} | "
              f"{r['student_mppi_return']:.0f} ({r['steps']} steps) |")
    doc = {"format": "tdmpc_jax-plan-fidelity", "student": FLAGS.student, "teacher": FLAGS.teacher,
           "data": FLAGS.data, "seed": FLAGS.seed, "candidates": FLAGS.candidates,
           "planner": {"iterations": pcfg.iterations, "num_samples": pcfg.num_samples}, "tasks": res}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic.write_file(out, json.dumps(doc, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
