"""What limits a distilled student: measurements on the teacher's own dataset (the study's `--diagnose`).

Three questions the MT30 study's scores alone cannot answer, each measured, not assumed:
  * data coverage: per task, the return of the policy that collected the data (the teacher's sampled
    policy prior), the teacher's MPPI return and the students' returns (`coverage`);
  * reward quality: how well each agent's reward head predicts the dataset's rewards at (obs, action),
    per task (R^2 where the rewards vary, and the mean absolute error): if the students already fit
    the data's own rewards as well as the teacher does, a term that regresses the student's reward onto
    the teacher's adds little information (`fit`);
  * imitation: how far each agent's policy mean (eval mode, tanh-squashed, the task's action dims) is
    from the teacher's on the same states, and from the dataset's (sampled) actions; and how often it
    sits at the bounds (`fit`);
  * the same where each agent acts (`own_states`): imitation learned on the teacher's states can fail on
    the states the student's own policy reaches (compounding errors, the covariate shift that DAgger
    corrects); its reward head can be right on the data and wrong where it plans;
  * how new the states of an added dataset (a DAgger round's episodes) are to the data they join
    (`novelty`: the distance of each added state to its nearest state of the same task in the base data,
    in observation space standardized per task with one scale for every comparison, `task_scales`).
Everything is computed on slices drawn from a dataset with a fixed seed, so agents are compared on the
same states (`own_states`: each agent's own episodes, the teacher's heads measured on them too).
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Sequence

import numpy as np


def sample_transitions(dataset, per_task: int, seed: int = 0):
    """(obs (N,O), action (N,A), reward (N,), task (N,)): `per_task` (obs, action, reward) transitions of
    every task of the dataset, drawn uniformly from its episodes with a fixed seed."""
    rng = np.random.default_rng(seed)
    n = per_task * len(dataset.tasks)
    obs, action, reward, task = dataset.sample(rng, 4 * n, 1)
    obs, action, reward = obs[0], action[0], reward[0]
    keep = np.concatenate([np.nonzero(task == t)[0][:per_task] for t in np.unique(task)])
    return obs[keep], action[keep], reward[keep], task[keep]


def _task_ids(agent, dataset, task):
    """The dataset's task indices as the agent's (both name their tasks)."""
    names = [dataset.tasks[int(t)] for t in task]
    return np.asarray([agent.config.task_index(n) for n in names], np.int32)


def fit(agents: Dict[str, object], teacher, dataset, per_task: int = 512, seed: int = 0, chunk: int = 4096) -> dict:
    """Per agent and task: reward R^2 and MAE against the dataset's rewards, policy-mean MSE against the
    teacher's and against the dataset's actions (over the task's action dims). -> {agent: {task: {...}}}."""
    obs, action, reward, task = sample_transitions(dataset, per_task, seed)
    dims = np.asarray([teacher.config.action_dims[teacher.config.task_index(dataset.tasks[int(t)])] for t in task])
    valid = np.arange(action.shape[1])[None] < dims[:, None]

    def heads(agent):
        tid = _task_ids(agent, dataset, task)
        r, pi = [], []
        for i in range(0, len(obs), chunk):
            z = agent.encode(obs[i:i + chunk], tid[i:i + chunk])
            r.append(np.asarray(agent.reward(z, action[i:i + chunk], tid[i:i + chunk])).reshape(-1))
            pi.append(np.asarray(agent.pi(z, tid[i:i + chunk])[0]))
        return np.concatenate(r), np.concatenate(pi)

    _, t_pi = heads(teacher)
    out = {}
    for name, agent in {"teacher": teacher, **agents}.items():
        r, pi = heads(agent)
        rows = {}
        for t in np.unique(task):
            m = task == t
            var = float(np.var(reward[m]))
            sq = lambda a, b: float(np.sum(((a - b) ** 2) * valid[m]) / np.sum(valid[m]))
            rows[dataset.tasks[int(t)]] = {
                "reward_mae": float(np.mean(np.abs(r[m] - reward[m]))),
                "reward_r2": 1.0 - float(np.mean((r[m] - reward[m]) ** 2)) / var if var > 1e-4 else None,
                "pi_mse_teacher": sq(pi[m], t_pi[m]),
                "pi_mse_data": sq(pi[m], action[m]),
                "pi_saturated": float(np.sum((np.abs(pi[m]) > 0.99) * valid[m]) / np.sum(valid[m]))}
        out[name] = rows
    return out


def own_states(agents: Dict[str, object], teacher, tasks: Sequence[str], episodes: int = 2, per_task: int = 512,
               seed: int = 0, progress: bool = False) -> Dict[str, dict]:
    """`fit` on the states each agent reaches: every agent (the teacher too, under "teacher") plays
    `episodes` policy-prior episodes per task (eval mode, the study's policy-prior protocol), and its heads
    and the teacher's are measured on `per_task` of its transitions per task.
    -> {agent: {"agent": {task: fit row}, "teacher": {task: the teacher's fit row on those states},
                "returns": {task: mean return of the episodes}}}."""
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.planner import PlannerConfig
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, agent in {"teacher": teacher, **agents}.items():
            ds = collect(agent, list(tasks), episodes, os.path.join(tmp, "own"), PlannerConfig(mpc=False), seed=seed,
                         eval_mode=True, progress=progress, overwrite=True)
            fits = fit({name: agent}, teacher, ds, per_task, seed)
            out[name] = {"agent": fits[name], "teacher": fits["teacher"], "returns": dict(ds.meta_returns)}
    return out


def summarize_own_states(own: Dict[str, dict], fits: Dict[str, dict]) -> Dict[str, dict]:
    """Per agent, means over tasks: the policy-mean MSE against the teacher's on the data's states (`fits`,
    from `fit`) and on the agent's own states; the reward MAE of the agent's head and of the teacher's on the
    agent's own states (and the agent's on the data, for reference); the own episodes' mean return / 10."""
    out = {}
    for name, v in own.items():
        tasks = list(v["agent"])
        mean = lambda rows, key: float(np.mean([rows[t][key] for t in tasks]))
        out[name] = {"pi_mse_teacher_data": mean(fits[name], "pi_mse_teacher"),
                     "pi_mse_teacher_own": mean(v["agent"], "pi_mse_teacher"),
                     "reward_mae_data": mean(fits[name], "reward_mae"),
                     "reward_mae_own": mean(v["agent"], "reward_mae"),
                     "teacher_reward_mae_own": mean(v["teacher"], "reward_mae"),
                     "score_own": float(np.mean([v["returns"][t] for t in tasks]) / 10.0), "tasks": len(tasks)}
    return out


def coverage(data_returns: Dict[str, float], teacher_mppi: dict, arms: Dict[str, np.ndarray],
             tasks: Sequence[str]) -> dict:
    """Per task: the data policy's mean return, the teacher's MPPI return and each arm's mean MPPI return
    (arms: name -> (runs, tasks) scores in return / 10, as the report's matrices); plus, per arm, the
    Spearman rank correlation over tasks of its returns with the data's and with the teacher's, and its
    total as a fraction of the data policy's and of the teacher's."""
    from scipy.stats import spearmanr
    data = np.asarray([data_returns[t] for t in tasks], np.float64)
    teach = np.asarray([teacher_mppi["tasks"][t]["mean"] for t in tasks], np.float64)
    res = {"tasks": {t: {"data": float(data[i]), "teacher_mppi": float(teach[i])} for i, t in enumerate(tasks)},
           "arms": {}}
    for arm, s in arms.items():
        m = 10.0 * np.asarray(s).mean(0)
        for i, t in enumerate(tasks):
            res["tasks"][t][arm] = float(m[i])
        res["arms"][arm] = {"runs": int(np.asarray(s).shape[0]),
                            "spearman_data": float(spearmanr(data, m)[0]),
                            "spearman_teacher": float(spearmanr(teach, m)[0]),
                            "of_data": float(m.sum() / data.sum()), "of_teacher": float(m.sum() / teach.sum())}
    res["data_of_teacher"] = float(data.sum() / teach.sum())
    return res


def summarize_fit(fits: dict) -> Dict[str, dict]:
    """Per agent, over tasks: median reward R^2 (tasks whose rewards vary; the median, as one task with
    near-constant rewards can drive a mean to any negative value), mean reward MAE, the number of tasks
    where its reward MAE is below the teacher's, mean policy MSE against the teacher and against the data
    (for actions at +-1, as these policies mostly are, 0 is the same action and 2 an unrelated one), and
    the fraction of action dims where its policy mean is beyond +-0.99."""
    out = {}
    teacher = fits.get("teacher", {})
    for name, rows in fits.items():
        r2 = [v["reward_r2"] for v in rows.values() if v["reward_r2"] is not None]
        out[name] = {"reward_r2_median": float(np.median(r2)),
                     "reward_mae": float(np.mean([v["reward_mae"] for v in rows.values()])),
                     "tasks_reward_mae_below_teacher": int(sum(v["reward_mae"] < teacher[t]["reward_mae"]
                                                               for t, v in rows.items() if t in teacher)),
                     "pi_mse_teacher": float(np.mean([v["pi_mse_teacher"] for v in rows.values()])),
                     "pi_mse_data": float(np.mean([v["pi_mse_data"] for v in rows.values()])),
                     "pi_saturated": float(np.mean([v["pi_saturated"] for v in rows.values()])),
                     "tasks": len(rows), "tasks_with_r2": len(r2)}
    return out


def _task_obs(dataset, task: str) -> np.ndarray:
    """Every observation of `task` in the dataset (float32, (n, obs_dim)); empty when it lacks the task."""
    if task not in dataset.tasks:
        return np.zeros((0, dataset.obs_dim), np.float32)
    rows = np.nonzero(np.asarray(dataset.arrays["task"]) == dataset.tasks.index(task))[0]
    return np.asarray(dataset.arrays["obs"][rows], np.float32)


def present_tasks(dataset) -> list:
    """The tasks that have episodes in the dataset (its meta lists every task of its task set), in its order."""
    ids = set(np.unique(np.asarray(dataset.arrays["task"])).tolist())
    return [t for i, t in enumerate(dataset.tasks) if i in ids]


def task_scales(datasets: Sequence, tasks: Sequence[str]) -> Dict[str, tuple]:
    """Per task, (mean, std) of every observation dim over the union of `datasets` (disjoint sets, e.g. a
    base dataset and each added round): one scale for every comparison `novelty` makes. Dims that never
    vary there (padding, constants) get std 0 and are left out of the distances."""
    out = {}
    for t in tasks:
        x = np.concatenate([_task_obs(d, t) for d in datasets])
        if not len(x):
            raise ValueError(f"task {t!r}: in none of the datasets")
        out[t] = (x.mean(0), x.std(0))
    return out


def nearest_distance(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Euclidean distance from each query row to its nearest base row (exact: scipy's k-d tree)."""
    from scipy.spatial import cKDTree
    return cKDTree(np.asarray(base, np.float64)).query(np.asarray(queries, np.float64))[0]


def novelty(base, added, scales: Dict[str, tuple], per_task: int = 1024, seed: int = 0) -> Dict[str, float]:
    """Per task (those of `scales`), the median distance from `per_task` states of the added dataset (drawn
    with a seed that depends on the seed and the task only, so the same added states meet every base) to
    their nearest state of the same task in the base dataset, in the standardized observation space of
    `scales` (`task_scales`). 0: every added state is already in the base; fresh episodes of the policy
    that collected the base give the scale of "nothing new"."""
    out = {}
    for i, t in enumerate(scales):
        mean, std = scales[t]
        keep = std > 1e-6
        z = lambda x: (x[:, keep] - mean[keep]) / std[keep]
        a, b = _task_obs(added, t), _task_obs(base, t)
        if not len(a) or not len(b):
            raise ValueError(f"task {t!r}: missing from the {'added' if not len(a) else 'base'} dataset")
        rng = np.random.default_rng([seed, i])
        q = a[rng.choice(len(a), min(per_task, len(a)), replace=False)]
        out[t] = float(np.median(nearest_distance(z(q), z(b))))
    return out
