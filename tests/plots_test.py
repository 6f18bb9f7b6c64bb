"""Charts: every bar gets its own color past matplotlib's 10-color cycle, or the caller's colors."""
import matplotlib.colors as mcolors
import pytest

from tdmpc_jax import plots


def _result(score):
    tasks = {t: {"score": score, "score_ci95": [score - 1, score + 1]} for t in ("cartpole-balance", "finger-spin")}
    return {"tasks": tasks, "normalized_score": score, "normalized_score_ci95": [score - 1, score + 1]}


@pytest.mark.parametrize("n", [3, 10, 12, 25])
def test_colors_are_distinct(n):
    assert len({mcolors.to_hex(c) for c in plots._colors(n)}) == n


def test_compare_runs_with_many_runs_and_given_colors(tmp_path):
    runs = {f"run {i}": _result(10 + i) for i in range(12)}
    out = plots.compare_runs(runs, str(tmp_path / "a.png"), "twelve runs")
    assert (tmp_path / "a.png").stat().st_size > 10_000 and out.endswith("a.png")
    colors = {k: ("tab:blue" if i % 2 else "tab:gray") for i, k in enumerate(runs)}
    plots.compare_runs(runs, str(tmp_path / "b.png"), colors=colors)
    assert (tmp_path / "b.png").stat().st_size > 10_000
    with pytest.raises(KeyError):
        plots.compare_runs(runs, str(tmp_path / "c.png"), colors={"run 0": "k"})
    assert not (tmp_path / "c.png").exists()


def test_arm_palette_is_one_color_per_arm_and_a_shade_of_it_per_data():
    pal = plots.arm_palette(("scratch", "reward", "plan"), ["mppi"])
    assert set(pal) == {"scratch", "reward", "plan", "scratch@mppi", "reward@mppi", "plan@mppi"}
    assert len({mcolors.to_hex(c) for c in pal.values()}) == 6
    assert mcolors.to_hex(pal["scratch"]) == mcolors.to_hex("C0")  # the headline arm keeps matplotlib's first color
    for a in ("scratch", "reward", "plan"):
        assert sum(pal[f"{a}@mppi"]) < sum(pal[a])
    variants = ["mppi", "dagger", "more", "dagger2", "x5"]
    pal = plots.arm_palette(("scratch", "reward"), variants)
    assert len({mcolors.to_hex(c) for c in pal.values()}) == 2 * 6  # every arm on every data: its own color
    for a in ("scratch", "reward"):
        hsv = mcolors.rgb_to_hsv(pal[a])
        for v in variants:  # a shade of the arm's hue
            assert abs(mcolors.rgb_to_hsv(pal[f"{a}@{v}"])[0] - hsv[0]) < 0.02, (a, v)


def _group(arm, mean, seeds):
    agg = {"mean": mean, "mean_ci95": [mean - 1, mean + 1]}
    return {"arm": arm, "seeds": list(range(1, seeds + 1)), "mppi": agg, "pi": dict(agg)}


def test_study_ablation_draws_each_arm_in_its_palette_color(tmp_path):
    import matplotlib.image as mimage
    import numpy as np
    summary = {"teacher": {"mppi_normalized_score": 28.9, "pi_normalized_score": 17.0},
               "groups": {"s/scratch": _group("scratch", 6.0, 3), "s/plan": _group("plan", 9.0, 3),
                          "s/reward+q": _group("reward+q", 6.5, 1)}}
    pal = {"scratch": (0.0, 0.0, 1.0), "plan": (0.0, 0.6, 0.0), "reward+q": (0.6, 0.0, 0.6)}
    plots.study_ablation(summary, ["s/scratch", "s/plan", "s/reward+q"], str(tmp_path / "a.png"), "arms", pal)
    img = (mimage.imread(str(tmp_path / "a.png"))[..., :3] * 255).round().astype(int)
    for arm in ("scratch", "plan"):  # several seeds: opaque bars in exactly the arm's color
        assert (np.abs(img - np.round(np.array(pal[arm]) * 255)).sum(-1) == 0).sum() > 500, arm
    with pytest.raises(KeyError):
        plots.study_ablation(summary, ["s/none"], str(tmp_path / "b.png"), "missing")
    assert not (tmp_path / "b.png").exists()
