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
flags.DEFINE_float("coef", 0.4, "reward-distillation coefficient (paper 0.4; released model 0.45)")
flags.DEFINE_float("kl_coef", 0.0, "extra: KL between two-hot reward distributions")
flags.DEFINE_float("q_coef", 0.0, "extra: Q-value distillation")
flags.DEFINE_float("policy_coef", 0.0, "extra: policy-prior distillation")
flags.DEFINE_enum("policy_loss", "new", ["new", "old"], "policy loss of tdmpc2 HEAD or of the 2023 code / fork")
flags.DEFINE_integer("seed", 1, "seed")
flags.DEFINE_integer("checkpoint_every", 1000, "save the train state every N steps (atomic)")
flags.DEFINE_integer("log_every", 50, "log metrics every N steps")
flags.DEFINE_integer("eval_every", 0, "evaluate (policy prior) every N steps; 0: never")
flags.DEFINE_string("eval_tasks", None, "tasks for periodic evaluation (default: the dataset's tasks)")
flags.DEFINE_integer("eval_episodes", 2, "episodes per task for periodic evaluation")
flags.DEFINE_string("coordinator", None, "multi-host: coordinator address host:port")
flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes")
flags.DEFINE_integer("process_id", 0, "multi-host: this process's id")


def main(argv):
    del argv
    from tdmpc_jax import train
    if FLAGS.coordinator:
        train.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    import tdmpc_jax
    from tdmpc_jax.config import TrainConfig
    from tdmpc_jax.data import Dataset
    from tdmpc_jax.offline import RunConfig, check_teacher, train_offline
    from tdmpc_jax.results_io import check_writable_dir
    check_writable_dir(FLAGS.output)
    dataset = Dataset(FLAGS.data)
    teacher = tdmpc_jax.load_checkpoint(FLAGS.teacher) if FLAGS.teacher else None
    task_set = FLAGS.task_set or (teacher.config.task_set if teacher else dataset.meta.get("task_set"))
    if not task_set:
        raise ValueError("cannot tell the student's task set: pass --task_set")
    from tdmpc_jax.config import config_from_spec
    cfg = config_from_spec(FLAGS.student_size, task_set)
    if teacher:
        check_teacher(cfg, teacher.config)
    coef = FLAGS.coef if teacher else 0.0
    tcfg = TrainConfig(batch_size=FLAGS.batch_size, distill_coef=coef,
                       distill_reward_kl_coef=FLAGS.kl_coef if teacher else 0.0,
                       distill_q_coef=FLAGS.q_coef if teacher else 0.0,
                       distill_policy_coef=FLAGS.policy_coef if teacher else 0.0, policy_loss=FLAGS.policy_loss)
    eval_tasks = tuple(t for t in (FLAGS.eval_tasks or "").split(",") if t) or \
        tuple(sorted({dataset.tasks[i] for i in set(dataset.arrays["task"][dataset.episodes[:-1]].tolist())}))
    run = RunConfig(steps=FLAGS.steps, seed=FLAGS.seed, log_every=FLAGS.log_every,
                    checkpoint_every=FLAGS.checkpoint_every, eval_every=FLAGS.eval_every, eval_tasks=eval_tasks,
                    eval_episodes=FLAGS.eval_episodes)
    agent, state = train_offline(cfg, tcfg, dataset, FLAGS.output, run, teacher)
    print(f"trained {int(state.step)} steps; agent in {FLAGS.output}/agent; curve in {FLAGS.output}/curve.png")


if __name__ == "__main__":
    cli.run(main)
