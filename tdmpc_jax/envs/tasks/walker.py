"""walker-walk-backwards / walker-run-backwards: the stock walker with a floor twice as long."""
from dm_control.rl import control
from dm_control.suite import walker as stock
from dm_control.utils import rewards

from tdmpc_jax.envs.tasks.xml_util import stock_model_with

_TIME_LIMIT, _CONTROL_TIMESTEP = 25, 0.025


def model():
    return stock_model_with("walker.xml", 'size="250 .8 .2"', 'size="500 .8 .2"')


class BackwardsPlanarWalker(stock.PlanarWalker):
    """Stock stand term times a move term rewarding centre-of-mass velocity below -move_speed."""

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.torso_height(), bounds=(stock._STAND_HEIGHT, float("inf")),
                                     margin=stock._STAND_HEIGHT / 2)
        upright = (1 + physics.torso_upright()) / 2
        stand = (3 * standing + upright) / 4
        move = rewards.tolerance(physics.horizontal_velocity(), bounds=(-float("inf"), -self._move_speed),
                                 margin=self._move_speed / 2, value_at_margin=0.5, sigmoid="linear")
        return stand * (5 * move + 1) / 6


def _make(speed, random):
    physics = stock.Physics.from_xml_string(*model())
    return control.Environment(physics, BackwardsPlanarWalker(move_speed=speed, random=random),
                               time_limit=_TIME_LIMIT, control_timestep=_CONTROL_TIMESTEP)


def walk_backwards(random=None):
    return _make(stock._WALK_SPEED, random)


def run_backwards(random=None):
    return _make(stock._RUN_SPEED, random)
