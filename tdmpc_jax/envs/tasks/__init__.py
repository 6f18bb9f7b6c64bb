"""The 11 custom MT30 tasks of TD-MPC2, built on dm_control's stock domains (no global registration).

`CUSTOM_TASKS[(domain, task)]` is a factory `(random) -> dm_control control.Environment`.
"""
from tdmpc_jax.envs.tasks import ball_in_cup, cheetah, hopper, pendulum, reacher, walker

CUSTOM_TASKS = {
    ("walker", "walk_backwards"): walker.walk_backwards,
    ("walker", "run_backwards"): walker.run_backwards,
    ("cheetah", "run_backwards"): cheetah.run_backwards,
    ("cheetah", "run_front"): cheetah.run_front,
    ("cheetah", "run_back"): cheetah.run_back,
    ("cheetah", "jump"): cheetah.jump,
    ("hopper", "hop_backwards"): hopper.hop_backwards,
    ("reacher", "three_easy"): reacher.three_easy,
    ("reacher", "three_hard"): reacher.three_hard,
    ("ball_in_cup", "spin"): ball_in_cup.spin,
    ("pendulum", "spin"): pendulum.spin,
}
