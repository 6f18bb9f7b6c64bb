"""Helper for train_test: one of N processes of a jax.distributed data-parallel run (not a test file)."""
import os
import sys

os.environ["XLA_FLAGS"] = ""  # one CPU device per process
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from losses_test import small_cfg  # noqa: E402
from tdmpc_jax import train  # noqa: E402
from tdmpc_jax.config import TrainConfig  # noqa: E402
from tdmpc_jax.losses import Batch  # noqa: E402


def batch(cfg, seed, B=8):
    rng = np.random.RandomState(seed)
    return Batch(rng.randn(4, B, cfg.obs_dim).astype(np.float32),
                 rng.uniform(-1, 1, (3, B, cfg.action_dim)).astype(np.float32),
                 rng.uniform(0, 2, (3, B)).astype(np.float32), rng.randint(0, cfg.num_tasks, B).astype(np.int32))


cfg, tcfg = small_cfg(dropout=0.01), TrainConfig(batch_size=8)
assert jax.device_count() == int(sys.argv[2]), jax.devices()
state = train.init_train_state(cfg, tcfg, jax.random.PRNGKey(0))
step = train.make_train_step(cfg, tcfg)  # the mesh spans every process's devices
for k in range(3):
    state, m = step(state, batch(cfg, k), jax.random.PRNGKey(k))
leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree_util.tree_leaves(state.params)]
if jax.process_index() == 0:
    np.savez(sys.argv[4], *leaves)
print("done", float(m["total_loss"].addressable_data(0)))
