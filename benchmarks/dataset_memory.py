"""Training memory does not grow with the dataset: build an N-GB dataset, train on it, report peak RSS.

  python benchmarks/dataset_memory.py [--gb=2] [--steps=20] [--dir=/tmp/tdmpc_mem]
Prints the dataset size on disk and the process's peak RSS after sampling + training (baseline: the
same run's RSS before the dataset is opened).
"""
import json
import os
import resource
import shutil
import sys
import time

from absl import app, flags

flags.DEFINE_float("gb", 2.0, "dataset size in GB")
flags.DEFINE_integer("steps", 20, "training updates (1M MT30 student, batch 256)")
flags.DEFINE_string("dir", "/tmp/tdmpc_mem", "where to build the dataset (deleted afterwards)")
FLAGS = flags.FLAGS


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(_):
    import jax
    import numpy as np

    from tdmpc_jax import train
    from tdmpc_jax.config import MT30_TASKS, TrainConfig, make_model_config
    from tdmpc_jax.data import Dataset, DatasetWriter
    from tdmpc_jax.losses import Batch

    cfg, tcfg = make_model_config(1, "mt30"), TrainConfig(batch_size=256)
    state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
    step = train.make_train_step(cfg, tcfg, mesh=train.make_mesh(jax.devices()[:1]))
    path = os.path.join(FLAGS.dir, "ds")
    bytes_per_step = (24 + 6 + 1 + 1) * 4
    episodes = int(FLAGS.gb * 1e9 / bytes_per_step / 501)
    rng = np.random.default_rng(0)
    t = time.time()
    ep = rng.standard_normal((501, 24)).astype(np.float32)
    with DatasetWriter(path, 24, 6, MT30_TASKS, "mt30") as w:
        for e in range(episodes):
            act = np.full((501, 6), 0.1, np.float32)
            rew = np.full(501, 0.5, np.float32)
            w.add_episode(ep + e % 7, act, rew, e % 30)
    print(f"wrote {episodes} episodes in {time.time() - t:.0f}s", flush=True)
    base = rss_mb()
    ds = Dataset(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    for k in range(FLAGS.steps):
        batch = Batch(*ds.sample(np.random.default_rng(k), 256, 3))
        state, m = step(state, batch, jax.random.PRNGKey(k))
    jax.block_until_ready(state)
    peak = rss_mb()
    shutil.rmtree(FLAGS.dir, ignore_errors=True)
    res = {"dataset_gb": size / 1e9, "rss_before_open_mb": base, "peak_rss_mb": peak, "updates": FLAGS.steps}
    print(f"dataset {size / 1e9:.2f} GB on disk; peak RSS {peak:.0f} MB (before opening it: {base:.0f} MB)")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
