"""Updates/s of the MT30 1M student (batch 256) without and with a teacher (5M and 317M shapes).

  python benchmarks/train_step.py [--cores=1] [--teachers=5,317] [--batch=256]
Run once per core count (the pinning happens before JAX starts). Prints ms/update, updates/s and
the peak RSS; the no-teacher step is the baseline the teacher overheads are relative to.
"""
import json
import os
import resource
import sys

from absl import app, flags

flags.DEFINE_integer("cores", 1, "CPU cores (pinned before JAX starts)")
flags.DEFINE_list("teachers", ["5", "317"], "teacher model sizes (MT30 shapes, random weights)")
flags.DEFINE_integer("batch", 256, "batch size")
flags.DEFINE_integer("repeats", 10, "timed updates")
FLAGS = flags.FLAGS


def main(_):
    from benchmarks.common import pin_cores
    pin_cores(FLAGS.cores)
    import jax
    import numpy as np

    from benchmarks.common import time_call
    from tdmpc_jax import networks, train
    from tdmpc_jax.config import TrainConfig, make_model_config
    from tdmpc_jax.losses import Batch

    cfg = make_model_config(1, "mt30")
    rng = np.random.RandomState(0)
    B, H = FLAGS.batch, 3
    batch = Batch(*(jax.numpy.asarray(x) for x in (
        rng.randn(H + 1, B, 24).astype(np.float32), rng.uniform(-1, 1, (H, B, 6)).astype(np.float32),
        rng.uniform(0, 2, (H, B)).astype(np.float32), rng.randint(0, 30, B).astype(np.int32))))
    mesh = train.make_mesh(jax.devices()[:1])
    results = {"cores": FLAGS.cores, "batch": B}
    print(f"jax {jax.__version__}, {FLAGS.cores} core(s), batch {B}", flush=True)
    for teacher in [None] + [int(t) for t in FLAGS.teachers]:
        tcfg = TrainConfig(batch_size=B, distill_coef=0.4 if teacher else 0.0)
        t_cfg = make_model_config(teacher, "mt30") if teacher else None
        t_params = networks.init_params(t_cfg, jax.random.PRNGKey(1))[0] if teacher else None
        step = train.make_train_step(cfg, tcfg, t_cfg, mesh)
        state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))

        def run(k):
            nonlocal state
            state, m = step(state, batch, k, t_params)
            return m["total_loss"]
        best, med = time_call(run, jax.random.PRNGKey(0), repeats=FLAGS.repeats)
        name = f"teacher_{teacher}M" if teacher else "no_teacher"
        results[name] = {"ms_per_update": best * 1e3, "median_ms": med * 1e3, "updates_per_s": 1 / best}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results[name]["peak_rss_mb_so_far"] = rss
        print(f"  {name:16s} {best * 1e3:8.1f} ms/update (median {med * 1e3:.1f})  {1 / best:6.2f} updates/s  "
              f"peak RSS {rss:.0f} MB", flush=True)
        del t_params
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
