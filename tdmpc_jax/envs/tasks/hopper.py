"""hopper-hop-backwards: stock hopper model and reset, rewarded for hopping at -1 m/s or faster."""
from dm_control.rl import control
from dm_control.suite import common
from dm_control.suite import hopper as stock
from dm_control.utils import rewards

_HOP_SPEED = 1


class HopBackwards(stock.Hopper):
    def get_reward(self, physics):
        standing = rewards.tolerance(physics.height(), (stock._STAND_HEIGHT, 2))
        hop = rewards.tolerance(physics.speed(), bounds=(-float("inf"), -_HOP_SPEED), margin=_HOP_SPEED / 2,
                                value_at_margin=0.5, sigmoid="linear")
        return standing * hop


def hop_backwards(random=None):
    physics = stock.Physics.from_xml_string(common.read_model("hopper.xml"), common.ASSETS)
    return control.Environment(physics, HopBackwards(hopping=True, random=random),
                               time_limit=stock._DEFAULT_TIME_LIMIT, control_timestep=stock._CONTROL_TIMESTEP)
