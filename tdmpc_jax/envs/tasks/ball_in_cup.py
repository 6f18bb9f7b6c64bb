"""cup-spin: keep the ball moving fast outside the cup; the reset mostly starts it inside."""
from dm_control.rl import control
from dm_control.suite import base, common
from dm_control.suite import ball_in_cup as stock
from dm_control.utils import rewards
import numpy as np

_INF = float("inf")


class Spin(stock.BallInCup):
    def initialize_episode(self, physics):
        out_of_target_allowed = self.random.uniform() < 0.1
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-.2, .2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(.2, .5)
            physics.after_reset()
            if physics.data.ncon == 0 and (out_of_target_allowed or physics.in_target()):
                break
        base.Task.initialize_episode(self, physics)

    def get_reward(self, physics):
        dist = np.linalg.norm(physics.ball_to_target())
        vel = np.linalg.norm(np.abs(physics.named.data.qvel[["ball_x", "ball_z"]]))
        far = rewards.tolerance(dist, bounds=(0.5, _INF), margin=0.25, value_at_margin=0.5, sigmoid="linear")
        fast = rewards.tolerance(vel, bounds=(6, _INF), margin=3, value_at_margin=0.5, sigmoid="linear")
        return (1 - physics.in_target()) * (far + 2 * fast) / 3


def spin(random=None):
    physics = stock.Physics.from_xml_string(common.read_model("ball_in_cup.xml"), common.ASSETS)
    return control.Environment(physics, Spin(random=random), time_limit=stock._DEFAULT_TIME_LIMIT,
                               control_timestep=stock._CONTROL_TIMESTEP)
