import pytest

from tdmpc_jax.config import MT30_TASKS, MT80_TASKS, ModelConfig, get_task_set, make_model_config


def test_official_task_dim_and_latent_quirks():
    assert make_model_config(1, "mt30").task_dim == 96
    assert make_model_config(317, "mt30").task_dim == 96
    for s in (5, 19, 48):
        assert make_model_config(s, "mt30").task_dim == 64
        assert make_model_config(s, "mt80").task_dim == 96
    assert make_model_config(19, "mt30").latent_dim == 512
    assert make_model_config(19, "mt80").latent_dim == 768


def test_task_sets_in_official_order():
    assert len(MT30_TASKS) == 30 and len(MT80_TASKS) == 80
    assert MT30_TASKS[0] == "walker-stand" and MT30_TASKS[29] == "pendulum-spin"
    assert MT80_TASKS[30] == "mw-assembly" and MT80_TASKS[79] == "mw-hand-insert"
    ts = get_task_set("mt80")
    assert ts.obs_dim == 39 and ts.action_dim == 6 and ts.episode_lengths[40] == 100


def test_config_roundtrip_and_errors():
    cfg = make_model_config(5, "mt30")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model size"):
        make_model_config(7, "mt30")
    with pytest.raises(ValueError, match="unknown task set"):
        make_model_config(1, "mt31")
    with pytest.raises(ValueError, match="not in this model's task set"):
        cfg.task_index("dog-run")
    with pytest.raises(ValueError, match="divisible"):
        make_model_config(1, "mt30", latent_dim=100)
