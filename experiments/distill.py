"""Offline multi-task TD-MPC2 training of a student, distilled from a teacher (TD-MPC-Opt) or from scratch.

  python experiments/distill.py --teacher=TEACHER --data=DATASET_DIR --student_size=1 --steps=200000 \
      --batch_size=256 --coef=0.4 --output=runs/student
  python experiments/distill.py --data=DATASET_DIR --output=runs/scratch        # no teacher: from scratch
Resumes exactly from DIR/train_state after a kill; writes metrics.{jsonl,csv}, curve.png and DIR/agent.
"""
from absl import flags

from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", None, "teacher checkpoint (.pt of any size, or Orbax); unset: train from scratch")
flags.DEFINE_string("data", None, "dataset directory (see experiments/collect.py, import_dataset.py)", required=True)
flags.DEFINE_string("output", None, "run directory", required=True)
flags.DEFINE_string("student_size", "1", "official size (1/5/19/48/317) or enc,mlp,latent dims e.g. 128,192,64")
flags.DEFINE_string("task_set", None, "student task set (default: the teacher's, else the dataset's)")
flags.DEFINE_integer("steps", 10000, "gradient updates")
flags.DEFINE_integer("batch_size", 256, "global batch size (paper: 256 better than 1024)")
flags.DEFINE_enum("policy_loss", "new", ["new", "old"], "policy loss of tdmpc2 HEAD or of the 2023 code / fork")
flags.DEFINE_bool("policy_emb_leak", False, "reproduce the official policy-loss leak into the task embedding "
                  "(README: 'Policy-loss leak')")
flags.DEFINE_integer("seed", 1, "seed")
flags.DEFINE_integer("checkpoint_every", 1000, "save the train state every N steps (atomic)")
flags.DEFINE_integer("log_every", 50, "log metrics every N steps")
flags.DEFINE_integer("eval_every", 0, "evaluate (policy prior) every N steps; 0: never")
flags.DEFINE_string("eval_tasks", None, "tasks for periodic evaluation (default: the dataset's tasks)")
flags.DEFINE_integer("eval_episodes", 2, "episodes per task for periodic evaluation")
flags.DEFINE_string("coordinator", None, "multi-host: coordinator address host:port")
flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes")
flags.DEFINE_integer("process_id", 0, "multi-host: this process's id")
cli.averaging_flags()
cli.block_flag()
DISTILL_COEFS = cli.distill_flags(coef=0.4)  # each needs --teacher
cli.existing_path("teacher")
cli.dataset_dir("data")
cli.output("output", "distill-run")
cli.size_spec("student_size")
cli.task_set_name("task_set")
cli.positive_int("steps", "batch_size", "checkpoint_every", "log_every", "eval_episodes", "num_processes")
cli.non_negative_int("eval_every", "process_id")
cli.seed("seed")
cli.task_list("eval_tasks", sets=False)


def _check_coordinator(v):
    host, sep, port = (v or "").rpartition(":")
    if v is not None and not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("must be host:port")


def _check_processes(v):
    if v["process_id"] >= v["num_processes"]:
        raise ValueError(f"--process_id={v['process_id']}: must be < --num_processes={v['num_processes']}")
    if v["num_processes"] > 1 and not v["coordinator"]:
        raise ValueError(f"--num_processes={v['num_processes']}: needs --coordinator=host:port")


def _check_teacher_flags(v):
    if v["teacher"] is None:
        for c in DISTILL_COEFS:
            if FLAGS[c].present and v[c] > 0:
                raise ValueError(f"--{c}={v[c]}: needs --teacher (without one the student trains from scratch)")
    if v["eval_tasks"] is not None and not v["eval_every"]:
        raise ValueError(f"--eval_tasks={v['eval_tasks']}: has no effect without --eval_every=N")


cli.rule("coordinator", _check_coordinator)
cli.check(("process_id", "num_processes", "coordinator"), _check_processes)
cli.check(("teacher", "eval_tasks", "eval_every") + DISTILL_COEFS, _check_teacher_flags)


def main(argv):
    del argv
    from tdmpc_jax import train
    if FLAGS.coordinator:
        train.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    import tdmpc_jax
    from tdmpc_jax.config import TrainConfig, student_config
    from tdmpc_jax.data import Dataset
    from tdmpc_jax.offline import RunConfig, check_teacher, train_offline
    from tdmpc_jax.results_io import claim_output
    teacher_given = FLAGS.teacher is not None
    tcfg = TrainConfig(batch_size=FLAGS.batch_size, policy_loss=FLAGS.policy_loss,
                       policy_emb_leak=FLAGS.policy_emb_leak, **cli.distill_coefficients(teacher_given))
    if teacher_given and not tcfg.uses_teacher:
        raise ValueError(f"--teacher={FLAGS.teacher}: every distillation coefficient is 0, so the teacher would be "
                         "ignored; drop --teacher to train from scratch")
    dataset = Dataset(FLAGS.data)  # meta.json and every value checked here, before any compile
    teacher = tdmpc_jax.load_checkpoint(FLAGS.teacher) if teacher_given else None
    task_set = FLAGS.task_set or (None if teacher else dataset.meta.get("task_set"))
    if teacher or task_set:  # an official task set, or a teacher's custom task list (e.g. checkpoints/teacher-mt4)
        cfg = student_config(FLAGS.student_size, teacher.config if teacher else None, task_set)
    else:  # from scratch on a dataset of a custom task list
        from tdmpc_jax.online import task_config
        cfg = task_config(dataset.tasks, FLAGS.student_size)
    if teacher:
        check_teacher(cfg, teacher.config)
    dataset.check_compatible(cfg, "student")
    if FLAGS.eval_tasks:
        eval_tasks = tuple(cli.check_tasks(FLAGS.eval_tasks, sets=False))
        bad = [t for t in eval_tasks if t not in cfg.tasks]
        if bad:
            raise ValueError(f"--eval_tasks={FLAGS.eval_tasks}: task {bad[0]!r} is not among the student's tasks")
    else:
        eval_tasks = tuple(sorted({dataset.tasks[i] for i in set(dataset.arrays["task"][dataset.episodes[:-1]].tolist())}))
    claim_output(FLAGS.output, "distill-run", FLAGS.overwrite)
    run = RunConfig(steps=FLAGS.steps, seed=FLAGS.seed, log_every=FLAGS.log_every,
                    checkpoint_every=FLAGS.checkpoint_every, eval_every=FLAGS.eval_every, eval_tasks=eval_tasks,
                    eval_episodes=FLAGS.eval_episodes, block=FLAGS.block, **cli.averaging(FLAGS.steps))
    agent, state = train_offline(cfg, tcfg, dataset, FLAGS.output, run, teacher)
    print(f"trained {int(state.step)} steps; agent in {FLAGS.output}/agent; curve in {FLAGS.output}/curve.png")


if __name__ == "__main__":
    cli.run(main)
