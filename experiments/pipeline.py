"""`make distill`: teacher -> dataset -> distilled and from-scratch students -> int8 -> evaluation table.

  python experiments/pipeline.py                      # embedded default: checkpoints/teacher-mt4, minutes on a CPU
  python experiments/pipeline.py --teacher=mt30-317M.pt --data=data/mt30 --student_size=1 --steps=1000000
Every stage skips work already done in --output (a killed run restarts where it stopped; training
resumes from its last checkpoint). Results: OUT/table.md, OUT/results.json, OUT/compare.png.
"""
import concurrent.futures
import dataclasses
import json
import os
import time

from absl import flags

from tdmpc_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", os.path.join(REPO, "checkpoints", "teacher-mt4"), "teacher checkpoint")
flags.DEFINE_string("data", None, "existing dataset dir (default: collect one with the teacher)")
flags.DEFINE_string("output", os.path.join(REPO, "runs", "distill"), "output directory")
flags.DEFINE_integer("collect_episodes", 8, "episodes per task collected with the teacher")
flags.DEFINE_bool("collect_mpc", True, "collect with the teacher's MPPI (false: its policy prior, much cheaper)")
flags.DEFINE_list("collect_random_actions", ["0", "0.1", "0.2", "0.4"],
                  "noise injection while the teacher collects: episode e of each task replaces each action with a "
                  "uniform random one with probability item[e % items] (the data then hold the states a perturbed "
                  "agent visits and the teacher's recoveries; docs/distillation.md); empty: none")
flags.DEFINE_string("student_size", "32,48,16", "student: official size or enc,mlp,latent dims")
flags.DEFINE_integer("steps", 3000, "updates for each student")
flags.DEFINE_integer("batch_size", 256, "batch size")
flags.DEFINE_string("tasks", None, "evaluation tasks (default: the teacher's)")
flags.DEFINE_integer("episodes", 10, "evaluation episodes per task (the same episodes for every agent)")
flags.DEFINE_bool("mpc", True, "evaluate with MPPI (false: the policy prior, much cheaper)")
flags.DEFINE_integer("iterations", 4, "MPPI iterations for the evaluation (official: 6)")
flags.DEFINE_integer("num_samples", 256, "MPPI samples for the evaluation (official: 512)")
flags.DEFINE_integer("seed", 1, "seed")
flags.DEFINE_float("td_coef", 0.0, "weight of the distilled student's own TD value loss (the scratch student's "
                   "is the official 0.1); 0: its Q values learn from the teacher alone, through the distillation terms")
flags.DEFINE_integer("jobs", 2, "agents evaluated at once (threads)")
flags.DEFINE_integer("onpolicy_rounds", 0,
                     "on-policy distillation rounds: the updates are split into rounds+1 equal phases; after each "
                     "phase the distilled student collects --collect_episodes per task with its own MPPI "
                     "(exploration on) and both students continue on the union (the teacher labels the new states "
                     "through the distillation terms; the scratch student gets the same data)")
cli.existing_path("teacher")
cli.dataset_dir("data")
cli.output("output", "pipeline")
cli.positive_int("collect_episodes", "steps", "batch_size", "episodes", "iterations")
cli.probability_list("collect_random_actions")
cli.int_range("jobs", lo=1, hi=4)
cli.finite_float("td_coef", lo=0)
cli.int_range("onpolicy_rounds", lo=0, hi=10)
cli.int_range("num_samples", lo=8)  # the evaluation keeps num_samples // 8 elites
cli.size_spec("student_size")
# both students are the mean of their weights after updates 2000, 2250, ..., 3000 (docs/distillation.md)
cli.averaging_flags(last=1 / 3, snapshots=5)
cli.block_flag()
# the default recipe (docs/distillation.md): the paper's reward term, the teacher policy's mean
# as the policy's target, and what the planner scores along imagined MPPI-like action sequences
DISTILL_FLAGS = cli.distill_flags(coef=0.4, policy_coef=1.0, plan_coef=1.0, plan_rank_coef=10.0)


def _check_distill(v):
    if not any(v[n] > 0 for n in DISTILL_FLAGS):  # the "distilled" student would be a second scratch one
        raise ValueError("every distillation coefficient is 0: the distilled student would equal the scratch one")


cli.check(DISTILL_FLAGS, _check_distill)
cli.task_list("tasks")
cli.seed("seed")
STUDENTS = ("distilled", "scratch")
AGENTS = ("teacher",) + STUDENTS + ("distilled-int8",)


def _check_parts(v):
    """What the stages write inside OUT must be ours too (OUT/data, the students, OUT/distilled-int8, OUT/eval/*)."""
    from tdmpc_jax.results_io import check_output
    out, ow = v["output"], v["overwrite"]
    parts = [("distilled-int8", "checkpoint")] + [(n, "distill-run") for n in STUDENTS] + \
        [(os.path.join("eval", n), "eval") for n in AGENTS] + ([] if v["data"] else [("data", "dataset")]) + \
        [(d, "dataset") for i in range(1, (v["onpolicy_rounds"] or 0) + 1) for d in _round_dirs(i)]
    for sub, kind in parts:
        try:
            check_output(os.path.join(out, sub), kind, ow)
        except ValueError as e:
            raise ValueError(f"--output={out}: {sub}: {getattr(e, 'problem', e)}") from None


def _round_dirs(i):
    return f"data-onpolicy-{i}", f"data-merged-{i}"


cli.check(("output", "overwrite", "data", "onpolicy_rounds"), _check_parts)


def main(argv):
    del argv
    import tdmpc_jax
    from tdmpc_jax.config import TrainConfig
    from tdmpc_jax.data import Dataset, DatasetError, merge_datasets
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.evaluation import evaluate, resolve_tasks
    from tdmpc_jax.offline import RunConfig, train_offline
    from tdmpc_jax.planner import PlannerConfig
    from tdmpc_jax.plots import compare_runs
    from tdmpc_jax.results_io import claim_output, write_results
    from tdmpc_jax.config import student_config

    out = FLAGS.output
    teacher = tdmpc_jax.load_checkpoint(FLAGS.teacher)
    tasks = resolve_tasks(teacher, FLAGS.tasks or list(teacher.config.tasks))
    cfg = student_config(FLAGS.student_size, teacher.config)  # the teacher's task set or custom task list
    claim_output(out, "pipeline", FLAGS.overwrite)
    print(f"[1/5] teacher {FLAGS.teacher}: {teacher.num_params()['learnable']:,} parameters, tasks {', '.join(tasks)}")
    data_dir = FLAGS.data or os.path.join(out, "data")
    try:
        ds = Dataset(data_dir)
        print(f"[2/5] dataset {data_dir}: {ds.num_episodes} episodes (reused)")
    except DatasetError:
        if FLAGS.data:
            raise
        print(f"[2/5] collecting {FLAGS.collect_episodes} episodes per task with the teacher ...", flush=True)
        ds = collect(teacher, tasks, FLAGS.collect_episodes, data_dir, PlannerConfig(mpc=FLAGS.collect_mpc),
                     FLAGS.seed, progress=False, overwrite=FLAGS.overwrite,
                     random_actions=[float(p) for p in FLAGS.collect_random_actions])
        print(f"      teacher returns while collecting: "
              + ", ".join(f"{t} {r:.0f}" for t, r in ds.meta_returns.items()), flush=True)
    pcfg = PlannerConfig.scaled(FLAGS.iterations, FLAGS.num_samples, mpc=FLAGS.mpc)
    rounds = FLAGS.onpolicy_rounds
    students = {}
    for phase in range(rounds + 1):
        upto = FLAGS.steps * (phase + 1) // (rounds + 1)
        if phase > 0:
            visits, merged = (os.path.join(out, d) for d in _round_dirs(phase))
            try:
                ds = Dataset(merged)
                print(f"[3/5] round {phase}: dataset {merged}: {ds.num_episodes} episodes (reused)")
            except DatasetError:
                print(f"[3/5] round {phase}: the distilled student collects {FLAGS.collect_episodes} episodes per "
                      f"task with its MPPI ...", flush=True)
                v = collect(students["distilled"], tasks, FLAGS.collect_episodes, visits,
                            dataclasses.replace(pcfg, mpc=True), FLAGS.seed + phase, progress=False, overwrite=True)
                print("      student returns while collecting: "
                      + ", ".join(f"{t} {r:.0f}" for t, r in v.meta_returns.items()), flush=True)
                ds = merge_datasets(merged, [ds, v], overwrite=True)
        run = RunConfig(steps=upto, seed=FLAGS.seed, log_every=max(1, FLAGS.steps // 40),
                        checkpoint_every=max(1, FLAGS.steps // 5), block=FLAGS.block,
                        **cli.averaging(FLAGS.steps))
        for name in STUDENTS:
            print(f"[3/5] training the {name} student (updates {FLAGS.steps * phase // (rounds + 1)}-{upto} of "
                  f"{FLAGS.steps}, {ds.num_episodes} episodes) ...", flush=True)
            extra = {"value_coef": FLAGS.td_coef} if name == "distilled" else {}
            tcfg = TrainConfig(batch_size=FLAGS.batch_size, **cli.distill_coefficients(name == "distilled"), **extra)
            claim_output(os.path.join(out, name), "distill-run", FLAGS.overwrite)
            students[name], _ = train_offline(cfg, tcfg, ds, os.path.join(out, name), run,
                                              teacher if tcfg.uses_teacher else None)
    print("[4/5] quantizing the distilled student to int8 ...", flush=True)
    qdir = students["distilled"].save(os.path.join(out, "distilled-int8"), fmt="int8")
    agents = {"teacher": teacher, "distilled": students["distilled"], "scratch": students["scratch"],
              "distilled-int8": tdmpc_jax.load_checkpoint(qdir)}
    print(f"[5/5] evaluating {len(agents)} agents x {len(tasks)} tasks x {FLAGS.episodes} episodes "
          f"({'MPPI ' + str(FLAGS.iterations) + 'x' + str(FLAGS.num_samples) if FLAGS.mpc else 'policy prior'}) ...",
          flush=True)
    def run(name):
        t0 = time.perf_counter()
        res = evaluate(agents[name], tasks, FLAGS.episodes, FLAGS.seed, pcfg, progress=False)
        print(f"  {name}: normalized score {res['normalized_score']:.1f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        write_results(os.path.join(out, "eval", name), res)
        return res

    # the agents' evaluations are independent: --jobs threads (XLA runs without the GIL, so one agent's
    # planning overlaps another's environment stepping); each result is the one a lone run gives
    with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
        results = dict(zip(agents, pool.map(run, agents)))
    table = _table(results, agents, tasks)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: {"normalized_score": v["normalized_score"], "ci95": v["normalized_score_ci95"],
                       "tasks": {t: {"mean": r["mean"], "std": r["std"], "ci95_score": r["score_ci95"]}
                                 for t, r in v["tasks"].items()}} for k, v in results.items()}, f, indent=1)
    compare_runs(results, os.path.join(out, "compare.png"), "teacher vs students")
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump({k: getattr(FLAGS, k) for k in ("teacher", "data", "collect_episodes", "collect_mpc",
                                                  "collect_random_actions", "student_size",
                                                  "steps", "batch_size", "episodes", "mpc", "iterations",
                                                  "num_samples", "seed", "onpolicy_rounds", "td_coef", "average_last",
                                                  "average_snapshots") + DISTILL_FLAGS}, f, indent=1)
    print(table)
    print(f"\nwrote {out}/table.md, results.json, compare.png")


def _table(results, agents, tasks):
    head = "| task | " + " | ".join(f"{n} ({agents[n].num_params()['learnable']:,} params)" for n in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for t in tasks:
        cells = []
        for n in results:
            r = results[n]["tasks"][t]
            lo, hi = r["score_ci95"]
            cells.append(f"{r['mean']:.0f} ± {r['std']:.0f} (CI {lo * 10:.0f}-{hi * 10:.0f})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **normalized score** | " + " | ".join(
        f"**{results[n]['normalized_score']:.1f}** ({results[n]['normalized_score_ci95'][0]:.1f}-"
        f"{results[n]['normalized_score_ci95'][1]:.1f})" for n in results) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
