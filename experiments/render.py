"""Render an agent (or random actions) acting in one task to a GIF (or MP4 with imageio installed).

  MUJOCO_GL=egl python experiments/render.py --task=cup-spin --checkpoint=PATH --output=x.gif [--mpc=false]
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

from absl import flags

from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("task", None, "task name, e.g. cup-spin", required=True)
flags.DEFINE_string("checkpoint", None, "agent checkpoint (.pt or Orbax dir); unset: random actions")
flags.DEFINE_string("output", None, "output .gif or .mp4", required=True)
flags.DEFINE_bool("mpc", True, "plan with MPPI (false: policy prior)")
flags.DEFINE_integer("seed", 1, "environment seed")
flags.DEFINE_integer("steps", 500, "agent steps to render")
flags.DEFINE_integer("size", 256, "frame height and width in pixels")
flags.DEFINE_integer("fps", 30, "frames per second of the output")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tdmpc_jax import envs, planner
    ext = os.path.splitext(FLAGS.output)[1].lower()
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"--output must end in .gif or .mp4, got {FLAGS.output!r}")
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output directory {out_dir!r} is not writable")
    env = envs.make(FLAGS.task, FLAGS.seed)
    agent = None
    if FLAGS.checkpoint:
        import tdmpc_jax
        from tdmpc_jax.evaluation import check_dims, resolve_tasks
        agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
        check_dims(agent, resolve_tasks(agent, [FLAGS.task]))
        cfg = agent.config
        pcfg = planner.PlannerConfig(mpc=FLAGS.mpc)
        params = jax.tree_util.tree_map(jnp.asarray, agent.params)
        task = jnp.int32(cfg.task_index(FLAGS.task) if cfg.multitask else 0)
        state = planner.init_state(cfg, pcfg)
    try:
        obs = env.reset()
        frames = [env.render(FLAGS.size, FLAGS.size)]
    except Exception as e:  # no GL backend: say so in one line
        raise RuntimeError(f"rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {e}") from None
    rng = np.random.RandomState(FLAGS.seed)
    total = 0.0
    for t in range(min(FLAGS.steps, env.episode_length)):
        if agent is None:
            a = rng.uniform(-1, 1, env.action_dim).astype(np.float32)
        else:
            padded = envs.pad_obs(obs, cfg.obs_dim)
            a, state = planner.act_one(cfg, pcfg, params, jnp.asarray(padded), task, state, jnp.bool_(t == 0),
                                       jax.random.PRNGKey(t))
            a = np.asarray(a)[: env.action_dim]
        obs, r, done, _ = env.step(a)
        total += r
        frames.append(env.render(FLAGS.size, FLAGS.size))
    if ext == ".gif":
        from PIL import Image
        imgs = [Image.fromarray(f) for f in frames]
        tmp = FLAGS.output + ".tmp.gif"
        imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=int(1000 / FLAGS.fps), loop=0)
        os.replace(tmp, FLAGS.output)
    else:
        try:
            import imageio
        except ImportError:
            raise ValueError("writing .mp4 needs `pip install imageio[ffmpeg]`; use a .gif output instead") from None
        imageio.mimsave(FLAGS.output, frames, fps=FLAGS.fps)
    print(f"wrote {FLAGS.output}: {len(frames)} frames, return {total:.1f}")


if __name__ == "__main__":
    cli.run(main)
