"""Architecture inference from shapes alone, for every official model size and both formats."""
import pytest

from tdmpc_jax.checkpoints import official
from tdmpc_jax.config import make_model_config


@pytest.mark.parametrize("fmt", ["old", "new"])
@pytest.mark.parametrize("size", [1, 5, 19, 48, 317])
@pytest.mark.parametrize("task_set", ["mt30", "mt80"])
def test_infer_config_from_shape_only_spec(size, task_set, fmt):
    cfg = make_model_config(size, task_set)
    shapes = official.expected_shapes(cfg, fmt)  # shapes only: nothing of 2 GB is allocated
    inferred = official.infer_config(shapes)
    assert inferred == cfg
    assert inferred.model_size == size


def test_317m_teacher_shapes():
    shapes = official.expected_shapes(make_model_config(317, "mt30"), "old")
    assert shapes["_encoder.state.0.weight"] == (4096, 120)
    assert shapes["_encoder.state.4.weight"] == (1376, 4096)
    assert shapes["_Qs.params.0"] == (8, 4096, 1478)
    assert shapes["_pi.0.weight"] == (4096, 1472)
    n = sum(int(__import__("numpy").prod(s)) for s in shapes.values())
    assert n == 503_472_705


def test_single_task_inference_and_custom_sizes():
    cfg = make_model_config(5, None, obs_dim=223, action_dim=38)
    got = official.infer_config(official.expected_shapes(cfg, "new"))
    assert (got.obs_dim, got.action_dim, got.multitask, got.model_size) == (223, 38, False, 5)
    custom = make_model_config(1, "mt30", mlp_dim=200)
    got = official.infer_config(official.expected_shapes(custom, "old"))
    assert got.mlp_dim == 200 and got.model_size is None


def test_override_and_unknown_task_set():
    cfg = make_model_config(1, "mt30")
    shapes = dict(official.expected_shapes(cfg, "old"))
    shapes["_task_emb.weight"] = (12, 96)
    with pytest.raises(ValueError, match="cannot infer the task set of a 12-task model"):
        official.infer_config(shapes)
    tasks = tuple(f"t{i}" for i in range(12))
    got = official.infer_config(shapes, tasks=tasks, action_dims=(6,) * 12)
    assert got.tasks == tasks
    assert official.infer_config(official.expected_shapes(cfg, "old"), log_std_min=-5.0).log_std_min == -5.0
