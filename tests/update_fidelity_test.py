"""The update's gradient-level fidelity to the official PyTorch code (reference doc §1.2, §3.5).

* Mish: value and derivative against float64 on a dense grid (autodiff through the one-exp quotient
  was off by up to 8e-6 for x in [8, 20)).
* nn.Embedding(max_norm=1): PyTorch rescales the looked-up rows IN the stored weight before the
  lookup (no autograd), so (a) the stored rows of the batch's tasks become row/(norm+1e-7), (b) the
  step taken from a weight W equals the step taken from W with those rows already rescaled (the
  gradient is that of a plain row), (c) the rows are rescaled again for the policy pass after the
  Adam step. Checked on the released checkpoint's weights (rows 16 and 21 have norm > 1), with two
  rows inflated to norm 1.5 so that a wrongly scaled gradient shows clearly.
* The official policy-loss leak (opt-in): the policy's embedding gradient enters the next step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmpc_jax import networks, train
from tdmpc_jax.config import TrainConfig
from tdmpc_jax.losses import Batch

BATCH_TASKS = np.array([16, 21, 3, 3, 0, 7, 16, 12], np.int32)  # 5 (norm 1.5) is NOT looked up
INFLATED = (3, 5)


def test_mish_value_and_derivative_match_float64():
    x32 = np.linspace(-30, 30, 600_001).astype(np.float32)
    x = x32.astype(np.float64)
    sp = np.logaddexp(0.0, x)
    th = np.tanh(sp)
    ref_value = x * th
    ref_grad = th + x * (0.5 * (1 + np.tanh(0.5 * x))) * (1 - th ** 2)
    value, grad = jax.jit(jax.vmap(jax.value_and_grad(networks.mish)))(jnp.asarray(x32))
    value, grad = np.asarray(value, np.float64), np.asarray(grad, np.float64)
    np.testing.assert_allclose(value, ref_value, rtol=5e-7, atol=1e-7)
    assert np.abs(grad - ref_grad).max() <= 1e-6
    # second-order use (jvp of the custom rule) stays finite
    assert np.isfinite(jax.vmap(jax.grad(jax.grad(networks.mish)))(jnp.asarray(x32[::1000]))).all()


@pytest.fixture(scope="module")
def setup(released_agent):
    cfg = released_agent.config
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), released_agent.params)
    w = params["task_emb"]["embedding"].copy()
    for r in INFLATED:
        w[r] *= 1.5 / np.linalg.norm(w[r].astype(np.float64))
    params["task_emb"]["embedding"] = w
    target = jax.tree_util.tree_map(np.copy, params["qs"])
    rng = np.random.RandomState(0)
    B = len(BATCH_TASKS)
    masks = np.asarray(networks.action_masks(cfg))[BATCH_TASKS]
    batch = Batch(rng.randn(4, B, cfg.obs_dim).astype(np.float32),
                  (rng.uniform(-1, 1, (3, B, cfg.action_dim)) * masks).astype(np.float32),
                  rng.uniform(0, 2, (3, B)).astype(np.float32), BATCH_TASKS)
    return cfg, params, target, batch


def _renorm64(w):
    """Float64 reference of torch.embedding_renorm_ on every row (norm > 1 -> row / (norm + 1e-7))."""
    w = np.asarray(w, np.float64)
    n = np.linalg.norm(w, axis=-1, keepdims=True)
    return np.where(n > 1.0, w / (n + 1e-7), w)


def _prenormed(params):
    """params with the batch's rows already rescaled (float64 reference, stored as float32)."""
    w = params["task_emb"]["embedding"].copy()
    rows = np.unique(BATCH_TASKS)
    w[rows] = _renorm64(w[rows]).astype(np.float32)
    return dict(params, task_emb={"embedding": w})


def _step(cfg, tcfg, params, target, batch, n=1):
    state = train.init_train_state(cfg, tcfg, params=params, target_qs=target)
    update = jax.jit(train.make_update(cfg, tcfg))  # params enter as arguments (nothing folded)
    states = []
    for k in range(n):
        state, _ = update(state, batch, jax.random.PRNGKey(k))
        states.append(state)
    return states


def _emb_mu(state):
    """Adam's first moment of the embedding: (1 - b1) x the (clipped) gradient after one step."""
    found = [x for p, x in jax.tree_util.tree_leaves_with_path(state.wm_opt)
             if "task_emb" in jax.tree_util.keystr(p) and x.ndim == 2]
    return np.asarray(found[0])  # mu comes before nu in optax's ScaleByAdamState


def test_looked_up_rows_are_written_back(setup):
    cfg, params, target, batch = setup
    raw = params["task_emb"]["embedding"]
    assert np.linalg.norm(raw[[16, 21]].astype(np.float64), axis=-1).min() > 1.0  # released rows > 1
    (state,) = _step(cfg, TrainConfig(batch_size=len(BATCH_TASKS), lr=0.0), params, target, batch)
    new = np.asarray(state.params["task_emb"]["embedding"], np.float64)
    ref = _renorm64(raw)
    looked_up = np.unique(BATCH_TASKS)
    np.testing.assert_allclose(new[looked_up], ref[looked_up], rtol=3e-7, atol=1e-9)  # float32 rounding
    others = np.setdiff1d(np.arange(cfg.num_tasks), looked_up)
    np.testing.assert_array_equal(new[others], raw[others])  # incl. row 5 (norm 1.5, not looked up)
    assert np.linalg.norm(raw[5].astype(np.float64)) > 1.4


def test_step_from_raw_rows_equals_step_from_rescaled_rows(setup):
    """The gradient w.r.t. a looked-up row is that of a plain row: rescaling first changes nothing."""
    cfg, params, target, batch = setup
    pre = _prenormed(params)
    tcfg = TrainConfig(batch_size=len(BATCH_TASKS))
    (a,) = _step(cfg, tcfg, params, target, batch)
    (b,) = _step(cfg, tcfg, pre, target, batch)
    mu_a, mu_b = _emb_mu(a), _emb_mu(b)
    assert np.abs(mu_a[3]).max() > 0
    np.testing.assert_allclose(mu_a, mu_b, rtol=1e-3, atol=1e-9)
    # parameters: equal up to Adam's first step on near-zero gradients (lr x g/(|g|+eps) flips)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=2 * tcfg.lr)


def test_policy_pass_rescales_rows_after_the_adam_step(setup):
    cfg, params, target, batch = setup
    pre = _prenormed(params)
    # a large step moves the (norm ~1) rows across 1: the policy pass must see them rescaled again
    (state,) = _step(cfg, TrainConfig(batch_size=len(BATCH_TASKS), lr=3e-2), pre, target, batch)
    new = np.asarray(state.params["task_emb"]["embedding"], np.float64)
    mu = _emb_mu(state)
    stepped = pre["task_emb"]["embedding"] - 3e-2 * np.sign(mu)  # Adam's first step: lr x sign(grad)
    looked_up = np.unique(BATCH_TASKS)
    crossed = [t for t in looked_up if np.linalg.norm(stepped[t].astype(np.float64)) > 1.0]
    assert crossed, "the test needs rows that cross norm 1"
    np.testing.assert_allclose(new[crossed], _renorm64(stepped[crossed]), atol=1e-6)
    assert np.linalg.norm(new[looked_up], axis=-1).max() <= 1.0 + 1e-6


def test_policy_embedding_leak_is_opt_in(setup):
    cfg, params, target, batch = setup
    B = len(BATCH_TASKS)
    off = _step(cfg, TrainConfig(batch_size=B), params, target, batch, n=2)
    on = _step(cfg, TrainConfig(batch_size=B, policy_emb_leak=True), params, target, batch, n=2)
    assert not np.any(np.asarray(off[0].emb_leak))
    leak = np.asarray(on[0].emb_leak)
    looked_up = np.unique(BATCH_TASKS)
    others = np.setdiff1d(np.arange(cfg.num_tasks), looked_up)
    assert np.abs(leak[looked_up]).sum(-1).min() > 0 and not np.any(leak[others])
    # step 1 is the same; step 2's embedding gradient gains the policy's: mu2 differs by (1 - b1) x leak
    np.testing.assert_array_equal(np.asarray(off[0].params["task_emb"]["embedding"]),
                                  np.asarray(on[0].params["task_emb"]["embedding"]))
    np.testing.assert_allclose(_emb_mu(on[1]) - _emb_mu(off[1]), 0.1 * leak, rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="new"):
        TrainConfig(policy_emb_leak=True, policy_loss="old")
