"""pendulum-spin: stock swing-up reset and observations, rewarded for |angular velocity| >= 9."""
from dm_control.rl import control
from dm_control.suite import common
from dm_control.suite import pendulum as stock
from dm_control.utils import rewards

_SPIN_SPEED = 9.0


class Spin(stock.SwingUp):
    def get_reward(self, physics):
        return rewards.tolerance(abs(physics.angular_velocity()[0]), bounds=(_SPIN_SPEED, float("inf")),
                                 margin=_SPIN_SPEED / 2, value_at_margin=0.5, sigmoid="linear")


def spin(random=None):
    physics = stock.Physics.from_xml_string(common.read_model("pendulum.xml"), common.ASSETS)
    return control.Environment(physics, Spin(random=random), time_limit=stock._DEFAULT_TIME_LIMIT)
