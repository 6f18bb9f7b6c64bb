"""Write a dataset by running a checkpoint on tasks (planner or policy prior, exploration noise on).

  python experiments/collect.py --checkpoint=PATH --tasks=cartpole-balance,cup-catch --episodes=20 \
      --mpc=false --output=data/small
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
flags.DEFINE_integer("seed", 1, "seed")
flags.DEFINE_string("output", None, "dataset directory to write", required=True)
cli.existing_path("checkpoint")
cli.task_list("tasks")
cli.positive_int("episodes")
cli.probability_list("random_actions")
cli.seed("seed")
cli.output("output", "dataset")


def main(argv):
    del argv
    import tdmpc_jax
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.planner import PlannerConfig
    agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
    ds = collect(agent, FLAGS.tasks, FLAGS.episodes, FLAGS.output, PlannerConfig(mpc=FLAGS.mpc), FLAGS.seed,
                 FLAGS.eval_mode, overwrite=FLAGS.overwrite, random_actions=[float(p) for p in FLAGS.random_actions])
    print(f"wrote {ds.num_episodes} episodes ({ds.num_steps} steps) to {FLAGS.output}; mean returns "
          + ", ".join(f"{t} {r:.0f}" for t, r in ds.meta_returns.items()))


if __name__ == "__main__":
    cli.run(main)
