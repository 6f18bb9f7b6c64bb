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
