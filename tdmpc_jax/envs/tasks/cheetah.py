"""Custom cheetah tasks (run-backwards, run-front, run-back, jump) on a ground plane twice as long."""
from dm_control.rl import control
from dm_control.suite import cheetah as stock
from dm_control.utils import rewards

from tdmpc_jax.envs.tasks.xml_util import stock_model_with

_TIME_LIMIT = 10
_RUN_SPEED = 10
_INF = float("inf")


def model():
    return stock_model_with("cheetah.xml", 'size="100 .8 .5"', 'size="200 .8 .5"')


def _up(z):
    return rewards.tolerance(z, bounds=(1.2, _INF), margin=0.6)


class CustomCheetah(stock.Cheetah):
    """Stock cheetah reset and observations with the TD-MPC2 custom rewards."""

    def __init__(self, goal, move_speed, random=None):
        self._goal, self._move_speed = goal, move_speed
        super().__init__(random=random)

    def _run_one(self, physics, lifted_foot):
        z = physics.named.data.xpos
        up = (3 * _up(z[lifted_foot, "z"]) + 2 * _up(z["torso", "z"])) / 5
        spd = rewards.tolerance(physics.speed(), bounds=(self._move_speed, _INF), margin=self._move_speed,
                                value_at_margin=0, sigmoid="linear")
        return up * (5 * spd + 1) / 6

    def _stand_one(self, physics, foot):
        z = physics.named.data.xpos
        height = _up((z["torso", "z"] + z[foot, "z"]) / 2)
        h = rewards.tolerance(physics.speed(), bounds=(-self._move_speed, self._move_speed),
                              margin=self._move_speed, value_at_margin=0, sigmoid="linear")
        return (5 * height + h) / 6

    def get_reward(self, physics):
        if self._goal == "run_backwards":
            return rewards.tolerance(physics.speed(), bounds=(-_INF, -self._move_speed), margin=self._move_speed,
                                     value_at_margin=0, sigmoid="linear")
        if self._goal == "run_front":
            return self._run_one(physics, "bfoot")
        if self._goal == "run_back":
            return self._run_one(physics, "ffoot")
        if self._goal == "jump":
            return (self._stand_one(physics, "bfoot") + self._stand_one(physics, "ffoot")) / 2
        raise ValueError(f"unknown cheetah goal {self._goal!r}")


def _make(goal, speed, random):
    physics = stock.Physics.from_xml_string(*model())
    return control.Environment(physics, CustomCheetah(goal, speed, random=random), time_limit=_TIME_LIMIT)


def run_backwards(random=None):
    return _make("run_backwards", 0.8 * _RUN_SPEED, random)


def run_front(random=None):
    return _make("run_front", 0.6 * _RUN_SPEED, random)


def run_back(random=None):
    return _make("run_back", 0.6 * _RUN_SPEED, random)


def jump(random=None):
    return _make("jump", 0.5, random)
