"""Write a dataset by running a checkpoint on tasks (planner or policy prior, exploration noise on).

  python experiments/collect.py --checkpoint=PATH --tasks=cartpole-balance,cup-catch --episodes=20 \
      --mpc=false --output=data/small
  python experiments/collect.py --checkpoint=PATH --tasks=mt30 --episodes=20 --mpc --resume --output=data/mppi
(--resume: hours of MPPI on a CPU; finished groups of episodes are kept in OUTPUT.partial/ and a rerun of
the same command plays only the rest.)
"""
from absl import flags

from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "agent checkpoint", required=True)
flags.DEFINE_string("tasks", None, "mt30 or comma-separated task names", required=True)
flags.DEFINE_integer("episodes", 10, "episodes per task")
flags.DEFINE_bool("mpc", False, "act with MPPI (default: policy prior)")
flags.DEFINE_bool("eval_mode", False, "no exploration noise")
flags.DEFINE_list("random_actions", [], "noise injection: episode e of each task replaces each action with a uniform "
                  "random one with probability item[e % items] (e.g. 0,0.1,0.2,0.4); empty: none")
flags.DEFINE_bool("resume", False, "play the episodes in groups of --group and keep each finished group in "
                  "OUTPUT.partial/; the same command after a kill plays only the missing groups (the dataset is "
                  "the one-batch collection's); not with --random_actions")
flags.DEFINE_integer("group", 16, "with --resume: episodes per group (rounded up to the planner's chunk)")
flags.DEFINE_integer("seed", 1, "seed")
flags.DEFINE_string("output", None, "dataset directory to write", required=True)
cli.existing_path("checkpoint")
cli.task_list("tasks")
cli.positive_int("episodes", "group")
cli.probability_list("random_actions")
cli.seed("seed")
cli.output("output", "dataset")


def _check_resume(v):
    if v["resume"] and any(float(p) for p in v["random_actions"] or []):
        raise ValueError("--resume: a resumable collection plays the planner's own actions (no --random_actions)")


cli.check(("resume", "random_actions"), _check_resume)


def main(argv):
    del argv
    import tdmpc_jax
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.planner import PlannerConfig
    agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
    ds = collect(agent, FLAGS.tasks, FLAGS.episodes, FLAGS.output, PlannerConfig(mpc=FLAGS.mpc), FLAGS.seed,
                 FLAGS.eval_mode, overwrite=FLAGS.overwrite, random_actions=[float(p) for p in FLAGS.random_actions],
                 resume_dir=FLAGS.output.rstrip("/") + ".partial" if FLAGS.resume else None, group=FLAGS.group)
    print(f"wrote {ds.num_episodes} episodes ({ds.num_steps} steps) to {FLAGS.output}; mean returns "
          + ", ".join(f"{t} {r:.0f}" for t, r in ds.meta_returns.items()))


if __name__ == "__main__":
    cli.run(main)
