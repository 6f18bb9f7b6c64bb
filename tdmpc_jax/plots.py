"""Charts a person would rather look at than read: per-task bars and aggregate scores with CIs."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, out_png: str):
    """Write the figure (its directory made first) and free it."""
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _colors(n: int):
    """n distinct colors: matplotlib's default cycle up to 10, tab20 up to 20, then a continuous map."""
    plt = _plt()
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = plt.get_cmap("tab20" if n <= 20 else "viridis")
    return [cmap(i if n <= 20 else i / (n - 1)) for i in range(n)]


def arm_palette(arms: Sequence[str], variants: Sequence[str] = ()) -> Dict[str, tuple]:
    """One color per arm, in the given order, for every figure of a study; `<arm>@<variant>` (the same arm
    on other data) gets a shade of its arm's color, one per variant: darker (the first variant), lighter,
    darker still, lighter still, ..."""
    import matplotlib.colors as mcolors
    base = dict(zip(arms, (mcolors.to_rgb(c) for c in _colors(len(arms)))))
    out = dict(base)
    for i, v in enumerate(variants):
        k = i // 2
        shade = ((lambda x, f=(0.55, 0.3, 0.15)[min(k, 2)]: f * x) if i % 2 == 0 else
                 (lambda x, f=(0.4, 0.75, 0.9)[min(k, 2)]: x + (1 - x) * f))
        out.update({f"{a}@{v}": tuple(shade(x) for x in c) for a, c in base.items()})
    return out


def compare_runs(runs: Dict[str, dict], out_png: str, title: str = "MT30 evaluation", colors=None):
    """runs: label -> results.json dict. Writes a per-task grouped bar chart and an aggregate panel.
    `colors`: label -> matplotlib color (e.g. one hue per arm over seeds); default: one distinct color each."""
    plt = _plt()
    tasks = sorted({t for r in runs.values() for t in r["tasks"]})
    labels = list(runs)
    colors = [colors[l] for l in labels] if colors else _colors(len(labels))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.6 * len(tasks) * max(1, len(labels) / 2) + 4), 5),
                                  gridspec_kw={"width_ratios": [max(3, len(tasks)), 1.2]})
    width = 0.8 / len(labels)
    x = np.arange(len(tasks))
    for i, lab in enumerate(labels):
        res = runs[lab]["tasks"]
        means = [res[t]["score"] if t in res else np.nan for t in tasks]
        lo = [res[t]["score"] - res[t]["score_ci95"][0] if t in res else 0 for t in tasks]
        hi = [res[t]["score_ci95"][1] - res[t]["score"] if t in res else 0 for t in tasks]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=2, label=lab,
               color=colors[i])
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("score (mean return / 10)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    norm = [runs[l]["normalized_score"] for l in labels]
    ci = np.array([runs[l]["normalized_score_ci95"] for l in labels])
    ax2.bar(np.arange(len(labels)), norm, yerr=[np.array(norm) - ci[:, 0], ci[:, 1] - np.array(norm)],
            capsize=4, color=colors)
    ax2.set_xticks(np.arange(len(labels)))
    ax2.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax2.set_title("normalized score (95% CI)")
    fig.tight_layout()
    _save(plt, fig, out_png)
    return out_png


def learning_curve(steps: Sequence[int], series: Dict[str, Sequence[float]], out_png: str, ylabel="value"):
    """One line per series over training steps (log-scaled when all values are positive)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(steps[: len(ys)], ys, label=name)
    if all(v > 0 for ys in series.values() for v in ys):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, out_png)
    return out_png


def study_scaling(summary: dict, out_png: str, colors: Dict[str, str] | None = None):
    """The distillation study: MT30 score (MPPI, mean with 95% CI) vs learnable params, one line per arm,
    the teacher as a horizontal line; the policy prior in a second panel. `colors`: arm -> color (the same
    arm in the same color in every study figure)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), sharex=True)
    arms = sorted({g["arm"] for g in summary["groups"].values()}, key=lambda a: (a != "scratch", a))
    colors = colors or arm_palette(arms)
    t = summary["teacher"]
    for ax, key, teacher_score, title in ((axes[0], "mppi", t["mppi_normalized_score"], "MPPI (official settings)"),
                                          (axes[1], "pi", t["pi_normalized_score"], "policy prior")):
        for i, arm in enumerate(arms):
            gs = sorted((g for g in summary["groups"].values() if g["arm"] == arm), key=lambda g: g["learnable_params"])
            x = np.array([g["learnable_params"] for g in gs], float) * (1 + 0.03 * (i - len(arms) / 2))
            m = np.array([g[key]["mean"] for g in gs])
            lo = m - np.array([g[key]["mean_ci95"][0] for g in gs])
            hi = np.array([g[key]["mean_ci95"][1] for g in gs]) - m
            ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=4, color=colors[arm], label=f"{arm} (seeds per size: {', '.join(str(len(g['seeds'])) for g in gs)})")
        if teacher_score is not None:
            ax.axhline(teacher_score, color="k", ls="--", lw=1)
            ax.plot([t["learnable_params"]], [teacher_score], "k*", ms=12)
            ax.text(5.5e4, teacher_score, f"teacher ({t['learnable_params'] / 1e6:.2f}M): {teacher_score:.1f}",
                    va="bottom", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(5e4, 3e6)
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.1 * (teacher_score or 0)))
        ax.set_xlabel("student learnable parameters")
        ax.set_ylabel("MT30 normalized score")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("Distilling the released TD-MPC-Opt 1M agent: score vs size (95% stratified-bootstrap CIs)")
    fig.tight_layout(rect=(0, 0, 0.78, 1))  # one legend for both panels, right of them: it hides no point
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(0.785, 0.5),
               frameon=False)
    _save(plt, fig, out_png)


def study_per_task(scores: Dict[str, np.ndarray], tasks: Sequence[str], teacher: Dict[str, float], out_png: str,
                   title: str, colors: Dict[str, str] | None = None):
    """Per-task horizontal bars (mean over runs, min-max whiskers) for each arm, tasks top to bottom in the
    given order, the teacher as a black tick: readable at 30 tasks x several arms. `colors`: arm -> color."""
    plt = _plt()
    arms = list(scores)
    colors = colors or arm_palette(arms)
    fig, ax = plt.subplots(figsize=(10, max(5.0, 0.12 * len(tasks) * (len(arms) + 1) + 1.2)))
    height = 0.8 / len(arms)
    y = np.arange(len(tasks))[::-1].astype(float)  # the first task on top
    for i, arm in enumerate(arms):
        s = scores[arm]
        m = s.mean(0)
        ax.barh(y + ((len(arms) - 1) / 2 - i) * height, m, height, xerr=[m - s.min(0), s.max(0) - m], capsize=1.5,
                color=colors[arm], label=f"{arm} ({s.shape[0]} seed{'s' if s.shape[0] > 1 else ''})", error_kw={"lw": 0.7})
    ax.scatter([teacher[t] for t in tasks], y, marker="|", s=160, color="k", zorder=3, label="teacher")
    ax.set_yticks(y)
    ax.set_yticklabels(tasks, fontsize=8)
    ax.set_ylim(-0.6, len(tasks) - 0.4)
    ax.set_xlabel("score (return / 10)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(plt, fig, out_png)


def study_coverage(cov: dict, arms: Sequence[str], out_png: str, title: str, colors: Dict[str, str] | None = None):
    """Per task: return of the policy that collected the data (x) against the teacher's MPPI and each arm's
    mean MPPI return (y), with the y = x line: what lies below it, the agent did worse than its data."""
    plt = _plt()
    tasks = list(cov["tasks"])
    x = np.asarray([cov["tasks"][t]["data"] for t in tasks])
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.plot([0, 1000], [0, 1000], color="0.6", lw=1, ls="--", label="y = data policy")
    ax.scatter(x, [cov["tasks"][t]["teacher_mppi"] for t in tasks], s=46, facecolors="none", edgecolors="k",
               label="teacher MPPI")
    colors = colors or arm_palette(arms)
    for arm in arms:
        c, a = colors[arm], cov["arms"][arm]
        ax.scatter(x, [cov["tasks"][t][arm] for t in tasks], s=18, color=c, alpha=0.85,
                   label=f"{arm} ({a['runs']} runs): {100 * a['of_data']:.0f}% of data, {100 * a['of_teacher']:.0f}% "
                         f"of teacher")
    named = [i for i in np.argsort(x)  # the tasks the teacher's planner wins far beyond its data, and the easy ones
             if cov["tasks"][tasks[i]]["teacher_mppi"] - x[i] > 300 or x[i] > 600]
    for k, i in enumerate(named):  # alternate above / below: neighbours' names do not overlap
        ax.annotate(tasks[i], (x[i], cov["tasks"][tasks[i]]["teacher_mppi"]), fontsize=7,
                    xytext=(5, 4 if k % 2 == 0 else -11), textcoords="offset points")
    ax.set_xlim(-20, 1020)
    ax.set_ylim(-20, 1020)
    ax.set_xlabel("return of the data's policy (teacher policy prior, sampled), per task")
    ax.set_ylabel("MPPI return, per task")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(plt, fig, out_png)


def study_ablation(summary: dict, groups: Sequence[str], out_png: str, title: str, colors: Dict[str, str] | None = None):
    """One size's arms side by side: MPPI and policy-prior normalized score (mean, 95% CI whiskers; a
    single seed has none and says so), with scratch's mean and CI as a shaded band to read each term
    against. `groups`: summary group keys (size/arm), top to bottom."""
    plt = _plt()
    gs = [summary["groups"][k] for k in groups]
    colors = colors or arm_palette([g["arm"] for g in gs])
    scratch = next((g for g in gs if g["arm"] == "scratch"), None)
    t = summary["teacher"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(gs) + 1.8), sharey=True)
    y = np.arange(len(gs))[::-1].astype(float)
    for ax, key, name, teacher_score in ((axes[0], "mppi", "MPPI (official settings)", t["mppi_normalized_score"]),
                                         (axes[1], "pi", "policy prior", t["pi_normalized_score"])):
        if scratch is not None:
            lo, hi = scratch[key]["mean_ci95"]
            ax.axvspan(lo, hi, color="0.85", zorder=0, label="scratch 95% CI")
            ax.axvline(scratch[key]["mean"], color="0.5", lw=1, zorder=1)
        for yi, g in zip(y, gs):
            m, (lo, hi) = g[key]["mean"], g[key]["mean_ci95"]
            one = len(g["seeds"]) < 2
            ax.barh(yi, m, 0.7, color=colors[g["arm"]], alpha=0.55 if one else 1.0,
                    xerr=None if one else [[m - lo], [hi - m]], capsize=3, zorder=2)
            ax.text(m if one else hi, yi, f"  {m:.1f}" + (" (1 seed)" if one else f" [{lo:.1f}, {hi:.1f}]"), va="center",
                    fontsize=8, zorder=3)
        ax.set_title(name + (f"; teacher {teacher_score:.1f}" if teacher_score is not None else ""), fontsize=10)
        ax.set_xlabel("MT30 normalized score")
        ax.set_xlim(0, 1.45 * max(g[key]["mean_ci95"][1] for g in gs))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([f"{g['arm']} ({len(g['seeds'])} seed{'s' if len(g['seeds']) > 1 else ''})" for g in gs],
                            fontsize=9)
    if scratch is not None:
        axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(plt, fig, out_png)


def study_novelty(res: dict, pairs: Sequence[str], out_png: str, title: str):
    """Per task (top to bottom in the given order), one marker per (added set | base) pair of
    `study.data_novelty`'s result: the median distance of the added states to their nearest base state.
    The pairs whose added set is the teacher's own policy are hollow: the base's "nothing new" level."""
    plt = _plt()
    tasks = res["tasks"]
    fig, ax = plt.subplots(figsize=(8.5, max(5.0, 0.26 * len(tasks) + 1.5) + 0.18 * len(pairs)))
    y = np.arange(len(tasks))[::-1].astype(float)
    markers = "osD^v<>"
    for i, (k, c) in enumerate(zip(pairs, _colors(len(pairs)))):
        v = res["pairs"][k]
        x = [v["tasks"][t] for t in tasks]
        off = ((len(pairs) - 1) / 2 - i) * 0.12
        hollow = v["actor"] == "teacher"
        ax.scatter(x, y + off, s=26, marker=markers[i % len(markers)], facecolors="none" if hollow else c,
                   edgecolors=c, label=f"{v['added']} ({v['actor']}) vs {v['base']} ({v['base_transitions']:,}): "
                                       f"median {v['median']:.2f}")
    ax.set_yticks(y)
    ax.set_yticklabels(tasks, fontsize=8)
    ax.set_ylim(-0.6, len(tasks) - 0.4)
    ax.set_xlabel("median distance of added states to the nearest base state (standardized observations)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    h = fig.get_figheight()
    below = (0.15 * len(pairs) + 0.2) / h  # the legend under the axes: it hides no task
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7.5, loc="lower center", ncol=1, frameon=False)
    fig.tight_layout(rect=(0, below, 1, 1))
    _save(plt, fig, out_png)
