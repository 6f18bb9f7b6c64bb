"""What each storage format costs and buys: output errors vs fp32, size, latency, (optional) score.

Used by experiments/quantize.py. Errors are measured on real observations collected by running the
fp32 agent's policy prior in the environments. Nothing here is per format: sizes and whether the
per-kernel sensitivity must be measured come from the format registry (`quantize.FORMATS`).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdmpc_jax import networks, planner, quantize, rollout
from tdmpc_jax.agent import Agent
from tdmpc_jax.envs import BatchedEnv


def collect_observations(agent: Agent, tasks: Sequence[str], steps: int = 50, seed: int = 1):
    """(obs (N, O), task ids (N,), policy actions (N, A)) from policy-prior rollouts, every 5th step kept."""
    cfg = agent.config
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    ids = jnp.asarray([cfg.task_index(t) for t in tasks], jnp.int32)
    pcfg = planner.PlannerConfig(mpc=False)
    obs_l, task_l, act_l = [], [], []

    def on_step(t, obs, act, rew, next_obs, done):
        if t % 5 == 0:
            obs_l.append(obs)
            task_l.append(np.asarray(ids))
            act_l.append(act)

    with BatchedEnv.for_episodes([(t, seed, 0) for t in tasks], obs_dim=cfg.obs_dim, action_dim=cfg.action_dim) as env:
        rollout.rollout(env, rollout.make_actor(cfg, pcfg, eval_mode=False), params, ids, steps, jax.random.PRNGKey,
                        state=planner.init_state(cfg, pcfg, len(tasks)), on_step=on_step, until_done=False)
    return np.concatenate(obs_l), np.concatenate(task_l), np.concatenate(act_l)


def model_outputs(cfg, params, obs, task, action):
    """Latent, next latent, reward, Q values (num_q, N) and policy mean on a batch."""
    @jax.jit
    def f(params, obs, task, action):
        emb = networks.embed(cfg, params, task)
        mask = networks.task_action_mask(cfg, task)
        z = networks.encode(cfg, params, obs, emb)
        mean, _ = networks.pi_dist(cfg, params, z, emb, mask)
        return {"latent": z, "next_latent": networks.next_latent(cfg, params, z, action, emb),
                "reward": networks.reward(cfg, params, z, action, emb),
                "q": networks.q_values(cfg, params["qs"], z, action, emb), "policy": jnp.tanh(mean)}
    return jax.tree_util.tree_map(np.asarray, f(params, obs, task, action))


def output_errors(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    return {k: {"max": float(np.abs(got[k] - ref[k]).max()), "mean": float(np.abs(got[k] - ref[k]).mean())}
            for k in ref}


def scalar_error(ref, got) -> float:
    """One number for ranking: mean abs error of each output relative to its mean magnitude, summed."""
    return float(sum(np.abs(got[k] - ref[k]).mean() / (np.abs(ref[k]).mean() + 1e-6) for k in ref))


def choose_mixed(agent: Agent, obs, task, action, share: float = 0.5):
    """Measure each kernel's int8 sensitivity; return (kernels kept fp16, sensitivity table)."""
    cfg = agent.config
    params = jax.tree_util.tree_map(jnp.asarray, agent.params)
    ref = model_outputs(cfg, params, obs, task, action)
    sens = quantize.sensitivity(params, lambda p: scalar_error(ref, model_outputs(cfg, p, obs, task, action)))
    return quantize.choose_fp16_kernels(sens, share), sens


def needs_sensitivity(formats: Sequence[str]) -> bool:
    """Whether any of `formats` uses the measured per-kernel sensitivity (see `choose_mixed`)."""
    return any(quantize.get_format(f).uses_sensitivity for f in formats)


def storage_size(params, fmt: str, sensitive=()) -> dict:
    """{'param_bytes': bytes of the params stored in `fmt`, 'bytes_per_param': the format's nominal
    bytes per kernel weight}."""
    f = quantize.get_format(fmt)
    return {"param_bytes": quantize.nbytes(quantize.convert(params, fmt, sensitive)),
            "bytes_per_param": f.bytes_per_param}


def dir_bytes(path) -> int:
    return int(subprocess.check_output(["du", "-sb", path]).split()[0])


def plan_latency_ms(cfg, params, repeats: int = 5) -> float:
    pcfg = planner.PlannerConfig()
    obs = jnp.zeros((cfg.obs_dim,))
    st = planner.init_state(cfg, pcfg)
    f = lambda k: planner.act_one(cfg, pcfg, params, obs, jnp.int32(0), st, jnp.bool_(False), k)
    jax.block_until_ready(f(jax.random.PRNGKey(0)))
    best = float("inf")
    for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(jax.random.PRNGKey(i)))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def write_report(out_dir: str, report: dict):
    """report.json, report.md and report.png in out_dir."""
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    rows = report["variants"]
    fp32 = rows["fp32"]["disk_bytes"] if "fp32" in rows else None
    lines = ["| variant | on disk | vs fp32 | param bytes | reward err (max/mean) | Q err (max/mean) | "
             "policy err (max/mean) | latent err (max/mean) | MPPI ms/action | score (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        e = r["errors"]
        ratio = f"{r['disk_bytes'] / fp32:.1%}" if fp32 and r.get("disk_bytes") else "-"
        score = "-"
        if "eval" in r:
            lo, hi = r["eval"]["normalized_score_ci95"]
            score = f"{r['eval']['normalized_score']:.2f} ({lo:.2f}-{hi:.2f})"
        disk = f"{r['disk_bytes'] / 1e6:.2f} MB" if r.get("disk_bytes") else "-"
        lines.append(f"| {name} | {disk} | {ratio} | {r['param_bytes'] / 1e6:.2f} MB | "
                     + " | ".join(f"{e[k]['max']:.2g} / {e[k]['mean']:.2g}" for k in ("reward", "q", "policy", "latent"))
                     + f" | {r.get('plan_ms', float('nan')):.0f} | {score} |")
    md = [f"# Quantization report: {report['checkpoint']}", "",
          f"Errors vs fp32 on {report['num_observations']} real observations from {len(report['tasks'])} tasks "
          f"(policy-prior rollouts). Compute mode: {report['compute']}.", ""] + lines
    if report.get("mixed_fp16_kernels"):
        md += ["", "Mixed keeps in fp16 (chosen by measured int8 sensitivity): "
               + ", ".join(f"`{k}`" for k in report["mixed_fp16_kernels"])]
    if report.get("compute_modes"):
        md += ["", "MPPI latency by compute mode (ms/action): "
               + ", ".join(f"{k} {v:.0f}" for k, v in report["compute_modes"].items())]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    _plot(out_dir, report)


def _plot(out_dir, report):
    from tdmpc_jax.plots import _plt
    plt = _plt()
    rows = report["variants"]
    names = list(rows)
    has_eval = all("eval" in r for r in rows.values())
    fig, axes = plt.subplots(1, 3 if has_eval else 2, figsize=(14 if has_eval else 10, 4))
    axes[0].bar(names, [rows[n]["param_bytes"] / 1e6 for n in names], color="C0")
    axes[0].set_ylabel("parameter MB")
    axes[0].set_title("size")
    for i, k in enumerate(("reward", "q", "policy", "latent")):
        vals = [max(rows[n]["errors"][k]["mean"], 1e-9) for n in names]
        axes[1].bar(np.arange(len(names)) + (i - 1.5) * 0.2, vals, 0.2, label=k)
    axes[1].set_yscale("log")
    axes[1].set_xticks(np.arange(len(names)))
    axes[1].set_xticklabels(names)
    axes[1].set_title("mean abs error vs fp32")
    axes[1].legend(fontsize=8)
    if has_eval:
        s = [rows[n]["eval"]["normalized_score"] for n in names]
        ci = np.array([rows[n]["eval"]["normalized_score_ci95"] for n in names])
        axes[2].bar(names, s, yerr=[np.array(s) - ci[:, 0], ci[:, 1] - np.array(s)], capsize=4, color="C2")
        axes[2].set_title("normalized score (95% CI)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "report.png"), dpi=110)
    plt.close(fig)
