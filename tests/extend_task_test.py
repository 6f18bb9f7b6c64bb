"""Adding a task from outside the package: one TaskSpec (+ its factory), one optional task set.

`slider-reach` below is a brand-new MuJoCo task (its own XML, a dm_control Task) defined in this file
alone; registering it makes config/dims, `envs.make`, `MultitaskEnv`, the CLI's task check, online task
configs, the action masks and evaluation work, and `task_registry.scoped` undoes it afterwards.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dm_control import mujoco
from dm_control.rl import control
from dm_control.suite import base
from dm_control.utils import rewards

from tdmpc_jax import cli, envs, networks, task_registry
from tdmpc_jax.agent import Agent
from tdmpc_jax.config import TASK_SETS, config_from_spec, get_task_set, make_model_config
from tdmpc_jax.evaluation import run_episodes
from tdmpc_jax.online import task_config
from tdmpc_jax.planner import PlannerConfig
from tdmpc_jax.task_registry import TaskSpec

_XML = """
<mujoco model="slider">
  <option timestep="0.01"/>
  <worldbody>
    <body name="cart">
      <joint name="slide" type="slide" axis="1 0 0" limited="true" range="-1 1" damping="0.5"/>
      <geom name="cart" type="box" size=".05 .05 .05" mass="1"/>
    </body>
  </worldbody>
  <actuator>
    <motor name="push" joint="slide" gear="2" ctrllimited="true" ctrlrange="-1 1"/>
  </actuator>
</mujoco>
"""


class Reach(base.Task):
    """Push a cart on a rail into [0.4, 0.6]."""

    def initialize_episode(self, physics):
        physics.named.data.qpos["slide"] = self.random.uniform(-0.5, 0.5)
        super().initialize_episode(physics)

    def get_observation(self, physics):
        return collections.OrderedDict(position=physics.data.qpos.copy(), velocity=physics.data.qvel.copy())

    def get_reward(self, physics):
        return rewards.tolerance(physics.data.qpos[0], bounds=(0.4, 0.6), margin=0.5)


def reach(random=None):
    physics = mujoco.Physics.from_xml_string(_XML)
    return control.Environment(physics, Reach(random=random), time_limit=10, control_timestep=0.02)


SLIDER = TaskSpec("slider-reach", obs_dim=2, action_dim=1, episode_length=50, loader=reach)


@pytest.fixture
def mini():
    before = (task_registry.task_names(), dict(TASK_SETS))
    with task_registry.scoped():
        yield task_registry.register_task_set("mini", [SLIDER, "pendulum-spin", "walker-walk"])
    assert (task_registry.task_names(), dict(TASK_SETS)) == before


def test_config_dims_and_cli(mini):
    assert mini.tasks == ("slider-reach", "pendulum-spin", "walker-walk")
    assert get_task_set("mini") is mini and TASK_SETS["mini"] is mini
    cfg = make_model_config(1, "mini")
    assert (cfg.task_set, cfg.tasks, cfg.obs_dims, cfg.action_dims, cfg.episode_lengths) == (
        "mini", mini.tasks, (2, 3, 24), (1, 1, 6), (50, 500, 500))
    assert (cfg.obs_dim, cfg.action_dim) == (24, 6)
    assert float(networks.discounts(cfg)[0]) == pytest.approx(0.95)  # clip(0.9): the 50-step episode
    assert cli.check_tasks("mini") == list(mini.tasks)
    assert cli.check_tasks("slider-reach", sets=False, task_set="mini") == ["slider-reach"]
    sub = task_config(["pendulum-spin", "slider-reach"], "16,16,16")
    assert (sub.obs_dims, sub.action_dims, sub.episode_lengths) == ((3, 2), (1, 1), (500, 50))


def test_build_and_step(mini):
    assert "slider-reach" in envs.known_tasks()
    env = envs.make("slider-reach", seed=0)
    assert (env.obs_dim, env.action_dim, env.episode_length) == (2, 1, 50)
    obs = env.reset()
    assert obs.shape == (2,) and -0.5 <= obs[0] <= 0.5
    dones = []
    for _ in range(50):
        obs, r, done, _ = env.step(np.ones(1, np.float32))
        assert np.all(np.isfinite(obs)) and 0.0 <= r <= 2.0
        dones.append(done)
    assert dones[-1] and not any(dones[:-1]) and obs[0] > 0.4  # pushed right for a second

    mt = envs.MultitaskEnv("mini", seed=0, tasks=["slider-reach", "pendulum-spin"])
    obs = mt.reset(0)
    assert obs.shape == (24,) and np.all(obs[2:] == 0)
    obs, _, _, _ = mt.step(np.array([0.5, 9, 9, 9, 9, 9], np.float32))  # padded dims are ignored
    assert obs.shape == (24,)


def test_masks_have_one_source(mini):
    cfg = make_model_config(1, "mini")
    want = np.array([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6], np.float32)
    np.testing.assert_array_equal(task_registry.action_masks(mini.action_dims), want)
    np.testing.assert_array_equal(envs.action_masks(mini), want)
    np.testing.assert_array_equal(np.asarray(networks.action_masks(cfg)), want)
    np.testing.assert_array_equal(np.asarray(networks.task_action_mask(cfg, jnp.array([2, 0]))), want[[2, 0]])


def test_evaluate_a_model_on_the_new_task(mini):
    cfg = config_from_spec("16,16,16", "mini")
    params, target_qs = networks.init_params(cfg, jax.random.PRNGKey(0))
    agent = Agent(cfg, params, target_qs)
    returns, actions = run_episodes(agent, [("slider-reach", 0, 0)], PlannerConfig(mpc=False), progress=False,
                                    record_actions=True)
    actions = np.asarray(actions)
    assert returns.shape == (1,) and np.isfinite(returns).all()
    assert actions.shape == (1, 50, 6) and np.all(actions[..., 1:] == 0)  # the episode length; masked dims


def test_registration_errors_and_scoping():
    with task_registry.scoped():
        task_registry.register_task(SLIDER)
        task_registry.register_task(SLIDER)  # the same spec again: no-op
        with pytest.raises(ValueError, match="already registered"):
            task_registry.register_task(TaskSpec("slider-reach", 2, 1))
        with pytest.raises(ValueError, match="already registered"):
            task_registry.register_task_set("mt30", ["slider-reach"])
        with pytest.raises(ValueError, match="unknown task"):
            task_registry.register_task_set("bad", ["slider-reach", "walker-fly"])
        with pytest.raises(ValueError, match="twice"):
            task_registry.register_task_set("dup", ["slider-reach", "slider-reach"])
        bad = task_registry.register_task(TaskSpec("pendulum-wrong", obs_dim=4, action_dim=1,
                                                   loader="tdmpc_jax.envs.tasks.pendulum:spin"))
        with pytest.raises(ValueError, match="differ from the registered"):
            envs.make(bad.name)
    for kw in ({"name": "nodash"}, {"obs_dim": 0}, {"episode_length": 2.5}, {"loader": "no.colon"}):
        with pytest.raises(ValueError):
            TaskSpec(**{"name": "a-b", "obs_dim": 1, "action_dim": 1, **kw})
    with pytest.raises(ValueError, match="unknown task"):
        envs.make("slider-reach")
    assert "slider-reach" not in task_registry.task_names() and set(TASK_SETS) == {"mt30", "mt80"}
