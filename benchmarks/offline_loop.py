"""The offline training loop (host sampling + update, `offline.train_offline`) in blocks of K updates per
jitted call (`RunConfig.block`), against K = 1 measured in the same run.

  python benchmarks/offline_loop.py [--student=64,128,32] [--arm=scratch] [--blocks=1,10,50] [--updates=500]

A study unit's update on an accelerator is a few ms of device work behind a host round trip per update
(sampling, transfer, dispatch, sync); a block of K updates is one call over K stacked batches. Each block
size trains the same student (MT30 shapes, a synthetic 30-task dataset) first for 2K updates (compiles),
then resumes for --updates more, timed from the loop's own clock (metrics `elapsed_s`: checkpoint load
and the final save excluded). Prints updates/s per block size and its ratio to K = 1, `rounds` times
interleaved (a shared machine's noise shows as spread). --arm picks a study arm's coefficients (teacher:
the released 1M student), e.g. `plan` for the study's most expensive update.
"""
import json
import os
import shutil
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("student", "64,128,32", "student dims (enc_dim,mlp_dim,latent_dim; `config.student_config`)")
flags.DEFINE_string("arm", "scratch", "study arm (tdmpc_jax.study.ARMS): its distillation coefficients")
flags.DEFINE_list("blocks", ["1", "10", "50"], "updates per jitted call to compare (the first is the baseline)")
flags.DEFINE_integer("updates", 500, "timed updates per block size and round (a multiple of every block)")
flags.DEFINE_integer("rounds", 2, "interleaved rounds")
flags.DEFINE_integer("batch", 256, "batch size")
FLAGS = flags.FLAGS


def synthetic_dataset(path, episodes=60):
    import numpy as np
    from tdmpc_jax.config import MT30_TASKS
    from tdmpc_jax.data import Dataset, DatasetWriter
    rng = np.random.default_rng(0)
    with DatasetWriter(path, 24, 6, MT30_TASKS, "mt30") as w:
        for e in range(episodes):
            w.add_episode(rng.standard_normal((501, 24)).astype(np.float32),
                          rng.uniform(-1, 1, (501, 6)).astype(np.float32),
                          rng.uniform(0, 1, 501).astype(np.float32), e % 30)
    return Dataset(path)


def main(_):
    import jax
    import tdmpc_jax
    from tdmpc_jax import study
    from tdmpc_jax.config import student_config
    from tdmpc_jax.offline import RunConfig, train_offline

    if not all(b.strip().isdigit() for b in FLAGS.blocks):
        sys.exit(f"error: --blocks={','.join(FLAGS.blocks)}: not a list of positive integers")
    blocks = [int(b) for b in FLAGS.blocks]
    if any(b < 1 or FLAGS.updates % b for b in blocks):
        sys.exit(f"error: --blocks={','.join(FLAGS.blocks)}: every block must be >= 1 and divide --updates={FLAGS.updates}")
    if FLAGS.arm not in study.ARMS:
        sys.exit(f"error: --arm={FLAGS.arm}: not a study arm ({', '.join(study.ARMS)})")
    tmp = tempfile.mkdtemp(prefix="offline_loop_")
    try:
        teacher = tdmpc_jax.load_checkpoint(os.path.join(REPO, "checkpoints", "td-mpc-opt",
                                                         "mt30_1M_steps_045dist_fp16.pt"))
        cfg = student_config(FLAGS.student, teacher.config)
        tcfg = study.train_config(FLAGS.arm, FLAGS.batch)
        ds = synthetic_dataset(os.path.join(tmp, "data"))
        print(f"device {jax.devices()[0].device_kind}; student {FLAGS.student}, arm {FLAGS.arm}, batch {FLAGS.batch}, {FLAGS.updates} timed updates per block and round", flush=True)
        rates = {b: [] for b in blocks}
        for r in range(FLAGS.rounds):
            for b in blocks:
                d = os.path.join(tmp, f"b{b}-r{r}")
                quiet = dict(seed=1, progress=False, block=b)
                train_offline(cfg, tcfg, ds, d, RunConfig(steps=2 * b, log_every=2 * b, checkpoint_every=2 * b, **quiet),
                              teacher if tcfg.uses_teacher else None)
                n = 2 * b + FLAGS.updates
                train_offline(cfg, tcfg, ds, d, RunConfig(steps=n, log_every=n, checkpoint_every=n, **quiet),
                              teacher if tcfg.uses_teacher else None)
                rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
                rates[b].append(FLAGS.updates / rows[-1]["elapsed_s"])
                shutil.rmtree(d)
        base = max(rates[blocks[0]])
        out = {}
        for b in blocks:
            best = max(rates[b])
            out[b] = {"updates_per_s": best, "all_rounds": rates[b], "x_baseline": best / base}
            print(f"block {b:4d}: {best:8.1f} updates/s (rounds: {', '.join(f'{x:.1f}' for x in rates[b])})"
                  f"  = {best / base:.2f}x block {blocks[0]}")
        print(json.dumps({"device": jax.devices()[0].device_kind, "student": FLAGS.student, "arm": FLAGS.arm,
                          "batch": FLAGS.batch, "blocks": out}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
