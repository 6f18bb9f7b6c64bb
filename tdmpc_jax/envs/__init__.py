"""DMControl environments for TD-MPC2: `make`, the MT30 custom tasks, multi-task and batched views."""
from tdmpc_jax.envs.batched import BatchedEnv
from tdmpc_jax.envs.dmc import DMCEnv, known_tasks, make, parse_task
from tdmpc_jax.envs.multitask import MultitaskEnv, action_masks, pad_obs

__all__ = ["BatchedEnv", "DMCEnv", "MultitaskEnv", "action_masks", "known_tasks", "make", "pad_obs",
           "parse_task"]
