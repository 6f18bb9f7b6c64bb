"""Online TD-MPC2 training (single- or multi-task) in our environments.

  python experiments/train_online.py --tasks=cartpole-balance --episodes=20 --output=runs/cartpole
  python experiments/train_online.py --tasks=cartpole-balance,pendulum-spin,reacher-easy --size=64,96,32 ...
Resumes from DIR after a kill; writes metrics.jsonl, curve.png and DIR/agent (Orbax).
"""
from absl import flags

from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("tasks", None, "comma-separated MT30 task names", required=True)
flags.DEFINE_string("output", None, "run directory", required=True)
flags.DEFINE_integer("episodes", 10, "episodes per task")
flags.DEFINE_string("size", "1", "official size (1/5/...) or enc,mlp,latent dims, e.g. 64,96,32")
flags.DEFINE_integer("batch_size", 256, "batch size")
flags.DEFINE_float("utd", 1.0, "updates per environment step")
flags.DEFINE_integer("seed_steps", 0, "random-action steps before learning (0: official max(1000, 5 x 500))")
flags.DEFINE_bool("mpc", False, "act with MPPI (default: policy prior with exploration)")
flags.DEFINE_integer("eval_every", 1, "evaluate every N episodes")
flags.DEFINE_integer("eval_episodes", 2, "evaluation episodes per task")
flags.DEFINE_integer("seed", 1, "seed")
cli.task_list("tasks", sets=False, task_set="mt30")
cli.output("output", "train-run")
cli.positive_int("episodes", "batch_size", "eval_episodes")
cli.non_negative_int("seed_steps", "eval_every")
cli.size_spec("size")
cli.finite_float("utd", lo=0, lo_open=True)
cli.seed("seed")


def main(argv):
    del argv
    from tdmpc_jax.config import TrainConfig
    from tdmpc_jax.online import OnlineConfig, task_config, train_online
    from tdmpc_jax.results_io import claim_output
    tasks = cli.check_tasks(FLAGS.tasks, sets=False, task_set="mt30")
    cfg = task_config(tasks, FLAGS.size)
    claim_output(FLAGS.output, "train-run", FLAGS.overwrite)
    agent = train_online(cfg, TrainConfig(batch_size=FLAGS.batch_size),
                         OnlineConfig(tasks=tasks, episodes=FLAGS.episodes, seed_steps=FLAGS.seed_steps,
                                      utd=FLAGS.utd, mpc=FLAGS.mpc, eval_every=FLAGS.eval_every,
                                      eval_episodes=FLAGS.eval_episodes, seed=FLAGS.seed), FLAGS.output)
    print(f"agent in {FLAGS.output}/agent ({agent.num_params()['learnable']:,} parameters)")


if __name__ == "__main__":
    cli.run(main)
