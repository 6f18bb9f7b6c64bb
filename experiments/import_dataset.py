"""Convert official TD-MPC2 dataset chunks (datasets/mt30/chunk_*.pt) into a tdmpc_jax dataset.

  python experiments/import_dataset.py --chunks='path/to/mt30/chunk_*.pt' --task_set=mt30 --output=data/mt30
Official data: https://huggingface.co/datasets/nicklashansen/tdmpc2 (mt30: 4 chunks, ~20 GB).
"""
import glob
import os

from absl import flags

from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("chunks", None, "glob of chunk_*.pt files", required=True)
flags.DEFINE_enum("task_set", "mt30", ["mt30", "mt80"], "task set the task ids refer to")
flags.DEFINE_string("output", None, "dataset directory to write", required=True)


def _check_chunks(v):
    if v is not None and not [p for p in glob.glob(v) if os.path.isfile(p)]:
        raise ValueError("no file matches")


cli.rule("chunks", _check_chunks)
cli.output("output", "dataset")


def main(argv):
    del argv
    from tdmpc_jax.config import get_task_set
    from tdmpc_jax.data.official_import import import_chunks
    paths = sorted(p for p in glob.glob(FLAGS.chunks) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match {FLAGS.chunks!r}")
    ts = get_task_set(FLAGS.task_set)
    ds = import_chunks(paths, FLAGS.output, ts.tasks, ts.name, overwrite=FLAGS.overwrite)
    print(f"wrote {ds.num_episodes} episodes, {ds.num_steps} steps to {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
