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


def compare_runs(runs: Dict[str, dict], out_png: str, title: str = "MT30 evaluation"):
    """runs: label -> results.json dict. Writes a per-task grouped bar chart and an aggregate panel."""
    plt = _plt()
    tasks = sorted({t for r in runs.values() for t in r["tasks"]})
    labels = list(runs)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.6 * len(tasks) * max(1, len(labels) / 2) + 4), 5),
                                  gridspec_kw={"width_ratios": [max(3, len(tasks)), 1.2]})
    width = 0.8 / len(labels)
    x = np.arange(len(tasks))
    for i, lab in enumerate(labels):
        res = runs[lab]["tasks"]
        means = [res[t]["score"] if t in res else np.nan for t in tasks]
        lo = [res[t]["score"] - res[t]["score_ci95"][0] if t in res else 0 for t in tasks]
        hi = [res[t]["score_ci95"][1] - res[t]["score"] if t in res else 0 for t in tasks]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=2, label=lab)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("score (mean return / 10)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    norm = [runs[l]["normalized_score"] for l in labels]
    ci = np.array([runs[l]["normalized_score_ci95"] for l in labels])
    ax2.bar(np.arange(len(labels)), norm, yerr=[np.array(norm) - ci[:, 0], ci[:, 1] - np.array(norm)],
            capsize=4, color=[f"C{i}" for i in range(len(labels))])
    ax2.set_xticks(np.arange(len(labels)))
    ax2.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax2.set_title("normalized score (95% CI)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
