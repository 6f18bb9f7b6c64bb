"""DMControl environments for TD-MPC2: `make`, the MT30 custom tasks, multi-task and batched views.

Tasks and task sets (names, dims, episode lengths, how to build each) are defined in
`tdmpc_jax.task_registry`; adding one is a `register_task` call there (see its docstring), plus the
task's factory for a custom task (the package's own live in `tdmpc_jax.envs.tasks`)."""
from tdmpc_jax.envs.batched import BatchedEnv
from tdmpc_jax.envs.dmc import DMCEnv, known_tasks, make, parse_task
from tdmpc_jax.envs.multitask import MultitaskEnv, action_masks, pad_obs

__all__ = ["BatchedEnv", "DMCEnv", "MultitaskEnv", "action_masks", "known_tasks", "make", "pad_obs",
           "parse_task"]
