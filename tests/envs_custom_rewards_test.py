"""Custom MT30 task rewards on hand-built physics states against their closed-form formulas."""
import math

import numpy as np
import pytest

from tdmpc_jax import envs

INF = float("inf")


# independent re-implementations of dm_control's tolerance (reference doc §6.2)
def tol_gauss(x, lo, hi, margin, v=0.1):
    if lo <= x <= hi:
        return 1.0
    if margin == 0:
        return 0.0
    d = (lo - x if x < lo else x - hi) / margin
    return math.exp(-0.5 * (d * math.sqrt(-2 * math.log(v))) ** 2)


def tol_linear(x, lo, hi, margin, v):
    if lo <= x <= hi:
        return 1.0
    d = (lo - x if x < lo else x - hi) / margin
    s = d * (1 - v)
    return 1 - s if s < 1 else 0.0


def _env(task):
    env = envs.make(task, seed=0)
    env.reset()
    return env, env.physics, env.dm_env.task


def _set(physics, qpos=None, qvel=None):
    with physics.reset_context():
        if qpos:
            for k, v in qpos.items():
                physics.named.data.qpos[k] = v
        if qvel:
            for k, v in qvel.items():
                physics.named.data.qvel[k] = v
    physics.forward()


def _zero_state(physics):
    physics.data.qpos[:] = 0
    physics.data.qvel[:] = 0


@pytest.mark.parametrize("task,speed", [("walker-walk-backwards", 1.0), ("walker-run-backwards", 8.0)])
@pytest.mark.parametrize("frac,move", [(1.0, 1.0), (2.0, 1.0), (0.5, 0.5), (0.0, 0.0), (-1.0, 0.0)])
def test_walker_backwards(task, speed, frac, move):
    env, ph, tk = _env(task)
    _zero_state(ph)
    _set(ph, qvel={"rootx": -frac * speed})
    h, zz, vx = ph.named.data.xpos["torso", "z"], ph.named.data.xmat["torso", "zz"], ph.horizontal_velocity()
    assert abs(vx + frac * speed) < 1e-9
    assert abs(min(max(-vx / speed, 0), 1) - move) < 1e-9
    stand = (3 * tol_gauss(h, 1.2, INF, 0.6) + (1 + zz) / 2) / 4
    want = stand * (5 * tol_linear(vx, -INF, -speed, speed / 2, 0.5) + 1) / 6
    assert abs(tk.get_reward(ph) - want) < 1e-12
    assert abs(want - stand * (5 * move + 1) / 6) < 1e-9


def test_walker_standing_edge_exactly_at_height():
    env, ph, tk = _env("walker-walk-backwards")
    _zero_state(ph)
    _set(ph)
    z0 = ph.named.data.xpos["torso", "z"]
    _set(ph, qpos={"rootz": 1.2 - z0}, qvel={"rootx": -1.0})
    assert abs(ph.named.data.xpos["torso", "z"] - 1.2) < 1e-12
    zz = ph.named.data.xmat["torso", "zz"]
    assert abs(tk.get_reward(ph) - (3 + (1 + zz) / 2) / 4) < 1e-9  # standing == 1, move == 1


def test_custom_floors_are_longer():
    env, ph, _ = _env("walker-walk-backwards")
    np.testing.assert_allclose(ph.named.model.geom_size["floor"], [500, 0.8, 0.2])
    env, ph, _ = _env("cheetah-run-backwards")
    np.testing.assert_allclose(ph.named.model.geom_size["ground"], [200, 0.8, 0.5])
    env, ph, _ = _env("walker-walk")
    np.testing.assert_allclose(ph.named.model.geom_size["floor"], [250, 0.8, 0.2])


@pytest.mark.parametrize("v,want", [(-8.0, 1.0), (-16.0, 1.0), (-4.0, 0.5), (0.0, 0.0), (3.0, 0.0)])
def test_cheetah_run_backwards(v, want):
    env, ph, tk = _env("cheetah-run-backwards")
    _zero_state(ph)
    _set(ph, qvel={"rootx": v})
    assert abs(ph.speed() - v) < 1e-9
    assert abs(tk.get_reward(ph) - want) < 1e-9
    assert abs(tk.get_reward(ph) - tol_linear(ph.speed(), -INF, -8, 8, 0)) < 1e-12


@pytest.mark.parametrize("task,foot", [("cheetah-run-front", "bfoot"), ("cheetah-run-back", "ffoot")])
@pytest.mark.parametrize("rootz,rooty,v", [(0.0, 0.0, 6.0), (1.0, 0.6, 3.0), (1.5, -0.6, 12.0), (0.3, 0.2, -1.0)])
def test_cheetah_run_one_foot(task, foot, rootz, rooty, v):
    env, ph, tk = _env(task)
    _zero_state(ph)
    _set(ph, qpos={"rootz": rootz, "rooty": rooty}, qvel={"rootx": v})
    z = ph.named.data.xpos
    up = (3 * tol_gauss(z[foot, "z"], 1.2, INF, 0.6) + 2 * tol_gauss(z["torso", "z"], 1.2, INF, 0.6)) / 5
    want = up * (5 * min(max(ph.speed() / 6, 0), 1) + 1) / 6
    assert abs(tk.get_reward(ph) - want) < 1e-9


def test_cheetah_run_front_edges():
    env, ph, tk = _env("cheetah-run-front")
    _zero_state(ph)
    _set(ph)
    zt, zb = ph.named.data.xpos["torso", "z"], ph.named.data.xpos["bfoot", "z"]
    # lift so that the back foot sits exactly at 1.2 and the torso above: both tolerances are 1
    _set(ph, qpos={"rootz": 1.2 - zb + 1e-12}, qvel={"rootx": 6.0})
    assert ph.named.data.xpos["torso", "z"] >= 1.2
    assert abs(tk.get_reward(ph) - 1.0) < 1e-9
    # far beyond the margin on both heights and no speed: reward -> (tiny up) * 1/6
    _set(ph, qpos={"rootz": -5.0}, qvel={"rootx": 0.0})
    assert tk.get_reward(ph) < 1e-12
    del zt


@pytest.mark.parametrize("v,h", [(0.0, 1.0), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0), (-2.0, 0.0)])
def test_cheetah_jump(v, h):
    env, ph, tk = _env("cheetah-jump")
    _zero_state(ph)
    _set(ph, qpos={"rootz": 0.7}, qvel={"rootx": v})
    z = ph.named.data.xpos
    stand = [(5 * tol_gauss((z["torso", "z"] + z[f, "z"]) / 2, 1.2, INF, 0.6) + h) / 6 for f in ("bfoot", "ffoot")]
    assert abs(tol_linear(ph.speed(), -0.5, 0.5, 0.5, 0) - h) < 1e-9
    assert abs(tk.get_reward(ph) - sum(stand) / 2) < 1e-9


@pytest.mark.parametrize("v,hop", [(-1.0, 1.0), (-3.0, 1.0), (-0.5, 0.5), (0.0, 0.0), (2.0, 0.0)])
def test_hopper_hop_backwards(v, hop):
    env, ph, tk = _env("hopper-hop-backwards")
    _zero_state(ph)
    _set(ph, qvel={"rootx": v})
    height = ph.named.data.xipos["torso", "z"] - ph.named.data.xipos["foot", "z"]
    standing = 1.0 if 0.6 <= height <= 2 else 0.0
    assert standing == 1.0
    assert abs(tk.get_reward(ph) - standing * min(max(-ph.speed(), 0), 1)) < 1e-9
    assert abs(min(max(-ph.speed(), 0), 1) - hop) < 1e-9


def test_hopper_hop_backwards_not_standing():
    env, ph, tk = _env("hopper-hop-backwards")
    _zero_state(ph)
    _set(ph, qpos={"rooty": math.pi / 2}, qvel={"rootx": -2.0})  # lying flat: height < 0.6
    height = ph.named.data.xipos["torso", "z"] - ph.named.data.xipos["foot", "z"]
    assert height < 0.6
    assert tk.get_reward(ph) == 0.0


@pytest.mark.parametrize("task,size", [("reacher-three-easy", 0.05), ("reacher-three-hard", 0.015)])
def test_reacher_three_sparse_reward_edges(task, size):
    env, ph, tk = _env(task)
    assert ph.model.nu == 3 and ph.model.njnt == 3
    np.testing.assert_allclose(np.rad2deg(ph.named.model.jnt_range["shoulder1"]), [-80, 80])
    assert ph.named.model.geom_size["target", 0] == size
    _set(ph, qpos={"shoulder0": 0.3, "shoulder1": -0.4, "wrist": 0.5})
    fx, fy = ph.named.data.geom_xpos["finger", :2]
    radii = size + 0.01
    for off, want in [(0.0, 1.0), (radii * 0.999, 1.0), (radii * 1.001, 0.0), (0.3, 0.0)]:
        ph.named.model.geom_pos["target", "x"] = fx + off
        ph.named.model.geom_pos["target", "y"] = fy
        ph.forward()
        assert tk.get_reward(ph) == want, (off, want)
    # finger position follows the three-link kinematics: .09 + .09 + .09 from the base
    _set(ph, qpos={"shoulder0": 0.0, "shoulder1": 0.0, "wrist": 0.0})
    np.testing.assert_allclose(ph.named.data.geom_xpos["finger", :2], [0.27, 0.0], atol=1e-12)


def test_reacher_three_obs_layout():
    env = envs.make("reacher-three-easy", seed=3)
    obs = env.reset()
    ph = env.physics
    np.testing.assert_allclose(obs[:3], ph.data.qpos, rtol=1e-6)
    np.testing.assert_allclose(obs[3:5], ph.named.data.geom_xpos["target", :2] - ph.named.data.geom_xpos["finger", :2],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("w,want", [(9.0, 1.0), (-9.0, 1.0), (20.0, 1.0), (4.5, 0.5), (-4.5, 0.5), (0.0, 0.0)])
def test_pendulum_spin(w, want):
    env, ph, tk = _env("pendulum-spin")
    _set(ph, qvel={"hinge": w})
    assert abs(tk.get_reward(ph) - want) < 1e-12


def test_cup_spin_reward_formula():
    env, ph, tk = _env("cup-spin")
    cases = [(0.0, 0.3, 0.0, 0.0), (0.35, -0.2, 6.0, 0.0), (-0.2, 0.1, 3.0, -1.0), (0.1, -0.4, 0.0, 9.0)]
    for bx, bz, vx, vz in cases:
        _set(ph, qpos={"ball_x": bx, "ball_z": bz}, qvel={"ball_x": vx, "ball_z": vz})
        dist = np.linalg.norm(ph.named.data.site_xpos["target", ["x", "z"]] - ph.named.data.xpos["ball", ["x", "z"]])
        vel = math.hypot(vx, vz)
        in_t = ph.in_target()
        want = (1 - in_t) * (min(1.0, 2 * dist) + 2 * min(1.0, vel / 6)) / 3
        assert abs(tk.get_reward(ph) - want) < 1e-9, (bx, bz, vx, vz)
    # ball inside the cup: no reward whatever its speed
    _set(ph, qpos={"ball_x": 0.0, "ball_z": 0.0})
    offset = ph.named.data.site_xpos["target", ["x", "z"]] - ph.named.data.xpos["ball", ["x", "z"]]
    _set(ph, qpos={"ball_x": offset[0], "ball_z": offset[1]}, qvel={"ball_x": 9.0, "ball_z": 0.0})
    assert ph.in_target() == 1.0
    assert tk.get_reward(ph) == 0.0


def test_cup_spin_reset_mostly_in_target_and_never_penetrating():
    env = envs.make("cup-spin", seed=7)
    inside = 0
    for _ in range(60):
        env.reset()
        assert env.physics.data.ncon == 0
        inside += env.physics.in_target()
    assert 40 <= inside <= 60  # ~90% start inside the cup (the rest may start anywhere)
