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
cli.task_list("task", sets=False, single=True)
cli.existing_path("checkpoint")
cli.output("output", "video", extensions=(".gif", ".mp4"))
cli.seed("seed")
cli.positive_int("steps", "fps")
cli.int_range("size", lo=16, hi=4096)


def main(argv):
    del argv
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    try:
        from tdmpc_jax import envs
    except Exception as e:  # dm_control loads the GL backend at import: say so in one line
        raise RuntimeError(f"rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: cannot load the "
                           f"GL backend ({type(e).__name__}: {e})") from None
    from tdmpc_jax import atomic, planner, rollout
    from tdmpc_jax.results_io import GIF_COMMENT, check_output
    ext = os.path.splitext(FLAGS.output)[1].lower()
    if ext == ".mp4":
        try:
            import imageio
        except ImportError:
            raise ValueError("writing .mp4 needs `pip install imageio[ffmpeg]`; use a .gif output instead") from None
    env = envs.make(FLAGS.task, FLAGS.seed)
    if FLAGS.checkpoint:
        import tdmpc_jax
        from tdmpc_jax.evaluation import check_dims, resolve_tasks
        agent = tdmpc_jax.load_checkpoint(FLAGS.checkpoint)
        check_dims(agent, resolve_tasks(agent, [FLAGS.task]))
        cfg = agent.config
        pcfg = planner.PlannerConfig(mpc=FLAGS.mpc)
        actor = rollout.make_actor(cfg, pcfg, batched=False)  # one problem, key PRNGKey(t) at step t
        params = jax.tree_util.tree_map(jnp.asarray, agent.params)
        state = planner.init_state(cfg, pcfg)
        task = np.asarray([cfg.task_index(FLAGS.task) if cfg.multitask else 0], np.int32)
        batch = envs.BatchedEnv([env], cfg.obs_dim, cfg.action_dim)
    else:  # random actions
        rng = np.random.RandomState(FLAGS.seed)
        actor = rollout.host_actor(lambda obs, task, t0: rng.uniform(-1, 1, (1, env.action_dim)).astype(np.float32))
        params = state = None
        task = np.zeros(1, np.int32)
        batch = envs.BatchedEnv([env])
    try:
        obs = batch.reset()
        frames = [env.render(FLAGS.size, FLAGS.size)]
    except Exception as e:  # no GL backend: say so in one line
        raise RuntimeError(f"rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {e}") from None
    total = rollout.rollout(batch, actor, params, task, min(FLAGS.steps, env.episode_length), jax.random.PRNGKey,
                            state=state, obs=obs,  # a frame after every step
                            on_step=lambda *_: frames.append(env.render(FLAGS.size, FLAGS.size)))[0]
    out = check_output(FLAGS.output, "video", FLAGS.overwrite)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if ext == ".gif":  # temp sibling, then rename; the comment marks it ours (a rerun may replace it)
        from PIL import Image
        imgs = [Image.fromarray(f) for f in frames]
        atomic.write_file(out, binary=True, writer=lambda f: imgs[0].save(
            f, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / FLAGS.fps), loop=0,
            comment=GIF_COMMENT))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # a temp file is created 0600; a GIF is for sharing
    else:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=os.path.dirname(out))
        os.close(fd)
        try:
            imageio.mimsave(tmp, frames, fps=FLAGS.fps)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"wrote {FLAGS.output}: {len(frames)} frames, return {total:.1f}")


if __name__ == "__main__":
    cli.run(main)
