"""The 11 custom MT30 tasks of TD-MPC2, built on dm_control's stock domains (no global registration).

Each module defines factories `(random) -> dm_control control.Environment` (e.g. `walker.walk_backwards`).
They are registered by name, with their dims and episode length, in `tdmpc_jax.task_registry` (its
`_MT30` table, loaders as "tdmpc_jax.envs.tasks.<module>:<factory>"), which `envs.make` reads. To add a
task: write its factory here (or anywhere) and register it there: see `tdmpc_jax.task_registry`.
"""
