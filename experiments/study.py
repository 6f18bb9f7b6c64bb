"""The MT30 distillation study (issue: does distillation work below 1M?), as resumable units.

  python experiments/study.py --stage=1                 # main size: scratch vs reward vs best, 3 seeds
  python experiments/study.py --stage=2                 # other sizes, the 1.4M control, the ablation
  python experiments/study.py --stage=3                 # make distill's planner-objective recipe, 3 seeds
  python experiments/study.py --stage=4 --jobs=4 --block=50     # the main size on teacher-MPPI data (a GPU machine)
  python experiments/study.py --stage=5                 # the main size on one DAgger round (a student's own states)
  python experiments/study.py --stage=6                 # a second DAgger round (round 1's best student acts)
  python experiments/study.py --report                  # tables + figures from the finished units
  python experiments/study.py --stage=1 --only=0.23M-best-s1   # one unit (e.g. on a GPU machine)
  python experiments/study.py --stage=2 --jobs=4 --block=50     # 4 units side by side (a GPU machine)
Teacher: the released TD-MPC-Opt 1M student (checkpoints/td-mpc-opt, MIT). Rerunning skips finished
units and resumes killed ones (see tdmpc_jax/study.py for the layout of --output).
"""
import json
import os
import sys
import time

from absl import flags

from tdmpc_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", os.path.join(REPO, "checkpoints", "td-mpc-opt", "mt30_1M_steps_045dist_fp16.pt"),
                    "teacher checkpoint (MT30)")
flags.DEFINE_string("output", os.path.join(REPO, "runs", "study"), "study directory (units, data)")
flags.DEFINE_string("results", os.path.join(REPO, "docs", "results", "study"), "where --report writes")
flags.DEFINE_string("teacher_mppi", os.path.join(REPO, "tests", "data", "reference", "released_1M_mppi_mt30_10ep.json"),
                    "the teacher's MPPI evaluation (results.json format): the reference line")
flags.DEFINE_integer("stage", 1, "1: main comparison; 2: sizes, control, ablation; 3: the planner-objective "
                     "recipe of make distill at the main size; 4: the main size on the teacher's MPPI data "
                     "(collected first: ~5 min on one H100, ~11 h on one CPU core, where it resumes group by group); 5: the "
                     "main size on one DAgger round: the stage-1 data plus the states a committed distilled "
                     "student reaches with its own policy prior (--results/students), labelled by the teacher "
                     "through the distillation terms; 6: a second DAgger round: round 1's data plus the states "
                     "that round 1's best student reaches")
flags.DEFINE_list("only", [], "run only these units (names as in runs/, e.g. 0.23M-best-s1)")
cli.block_flag()
flags.DEFINE_bool("report", False, "rebuild the tables and figures from finished units (those under --output and "
                  "those whose per-run JSON is committed under --results/runs) and carry the units that are "
                  "started but not finished into --results/inflight/ (trained: the student and finished evaluation "
                  "groups; training: the last checkpoint; a later sitting, in a fresh clone too, goes on from "
                  "there), then exit; run it when no unit is running")
flags.DEFINE_bool("diagnose", False, "measure what limits the students (data coverage; reward and policy fit of "
                  "the teacher and of the main size's students on the study's dataset) into --results/diagnosis.*, "
                  "then exit")
flags.DEFINE_bool("novelty", False, "measure how new the states of each added dataset (stages 5-6: DAgger rounds "
                  "and their control) are to the data they join, into --results/novelty.{json,md,png}, then exit")
flags.DEFINE_bool("prepare", False, "only collect the datasets the units need and evaluate the teacher's policy "
                  "prior (where --results holds no teacher_pi.json), then exit (--jobs runs this first, in its own process)")
flags.DEFINE_bool("redo_committed", False, "run units again whose results are committed under --results/runs "
                  "(default: they count as finished)")
flags.DEFINE_integer("steps", 10_000, "updates per student")
flags.DEFINE_integer("batch_size", 256, "batch size")
flags.DEFINE_integer("collect_episodes", 20, "teacher episodes per task in the dataset")
flags.DEFINE_integer("mppi_episodes", 3, "MPPI evaluation episodes per task")
flags.DEFINE_integer("pi_episodes", 10, "policy-prior evaluation episodes per task")
flags.DEFINE_integer("jobs", 1, "units run side by side, each in its own process (logs in OUTPUT/logs/); "
                     "the data and the teacher's evaluation come first, in this process")
flags.DEFINE_integer("eval_workers", -1, "environment worker processes per evaluation (0: step in-process; -1: "
                     "the backend's default, as evaluate.py --workers=-1)")
cli.existing_path("teacher", "teacher_mppi")
cli.positive_int("jobs")
cli.positive_int("steps", "batch_size", "collect_episodes", "mppi_episodes", "pi_episodes")
cli.int_range("eval_workers", lo=-1, hi=256)
cli.output("output", "study")
cli.output("results", "study-results")


def _check_stage(v):
    from tdmpc_jax.study import STAGES  # the stages' one place
    cli.int_range_check(v, lo=1, hi=STAGES)


def _check_only(v):
    from tdmpc_jax.study import STAGES, stage_units
    names = [u.name for u in stage_units(v["stage"])] if 1 <= v["stage"] <= STAGES else []
    bad = [n for n in v["only"] or [] if n not in names]
    if bad:
        raise ValueError(f"--only={','.join(v['only'])}: {bad[0]!r} is not a stage-{v['stage']} unit "
                         f"(e.g. {names[0] if names else '?'})")


def _check_only_names(v):
    from tdmpc_jax.study import parse_unit_name
    for n in v or []:
        parse_unit_name(n)


cli.rule("stage", _check_stage)
cli.rule("only", _check_only_names)
cli.check(("only", "stage"), _check_only)


def main(argv):
    del argv
    from tdmpc_jax import study
    out = FLAGS.output
    scfg = study.StudyConfig(steps=FLAGS.steps, batch_size=FLAGS.batch_size, collect_episodes=FLAGS.collect_episodes,
                             pi_episodes=FLAGS.pi_episodes, mppi_episodes=FLAGS.mppi_episodes)
    units = study.stage_units(FLAGS.stage)
    if FLAGS.only:
        units = [u for u in units if u.name in FLAGS.only]
    if FLAGS.novelty:
        from tdmpc_jax.results_io import claim_output
        study.novelty_datasets(out)  # nothing to measure: the error before --results is touched
        claim_output(FLAGS.results, "study-results", FLAGS.overwrite)
        study.data_novelty(out, FLAGS.results)
        print(open(os.path.join(FLAGS.results, "novelty.md")).read())
        return
    if not FLAGS.report and not FLAGS.diagnose and not FLAGS.redo_committed:
        # units whose results are committed (--results/runs/<unit>.json, e.g. run on another machine or
        # before this clone) are finished: the report reads them from there
        committed = {u.name for u, *_ in study.committed_units(FLAGS.results)}
        for u in units:
            if u.name in committed:
                print(f"[{u.name}] finished: committed in {os.path.join(FLAGS.results, 'runs', u.name + '.json')} "
                      f"(--redo_committed runs it again)", flush=True)
        units = [u for u in units if u.name not in committed]
        if not units:
            print("every unit asked for is finished; --report rebuilds the tables and figures", flush=True)
            return
    if not FLAGS.report and not FLAGS.diagnose:  # units an earlier sitting carried: checked before any work
        for u in units:
            carried = os.path.join(FLAGS.results, study.INFLIGHT, u.name)
            if os.path.isdir(carried):
                study.check_carried(carried, u.name)
    if FLAGS.jobs > 1 and len(units) > 1 and not FLAGS.report and not FLAGS.diagnose and not FLAGS.prepare:
        return _run_jobs(study, units)
    teacher_mppi = _read_json(FLAGS.teacher_mppi)
    import tdmpc_jax
    from tdmpc_jax.planner import PlannerConfig
    teacher = tdmpc_jax.load_checkpoint(FLAGS.teacher)
    from tdmpc_jax.results_io import claim_output
    if FLAGS.diagnose:
        claim_output(FLAGS.results, "study-results", FLAGS.overwrite)
        study.diagnose(out, FLAGS.results, teacher, teacher_mppi)
        print(open(os.path.join(FLAGS.results, "diagnosis.md")).read())
        return
    if FLAGS.report:
        claim_output(FLAGS.results, "study-results", FLAGS.overwrite)
        s = study.report(out, FLAGS.results, teacher_mppi, study.teacher_pi_evaluation(out, FLAGS.results),
                         teacher.num_params()["learnable"])
        print(open(os.path.join(FLAGS.results, "summary.md")).read())
        return
    claim_output(out, "study", FLAGS.overwrite)
    # the datasets these units train on (each collected once; study.DATA)
    datasets = {d: study.ensure_data(out, teacher, scfg, data=d, students=os.path.join(FLAGS.results, "students"))
                for d in sorted({u.data for u in units})}
    if study.teacher_pi_evaluation(out, FLAGS.results) is None:  # the report's line (committed once it is made)
        study._evaluate_into(os.path.join(out, "teacher", "eval_pi"), teacher, study.study_tasks(teacher, scfg),
                             scfg.pi_episodes, PlannerConfig(mpc=False), True)
    if FLAGS.prepare:
        return
    t0 = time.perf_counter()
    for i, u in enumerate(units):
        rec = study.run_unit(out, u, teacher, datasets[u.data], scfg, REPO, log=lambda m: print(m, flush=True),
                             eval_workers=FLAGS.eval_workers, block=FLAGS.block,
                             carried=os.path.join(FLAGS.results, study.INFLIGHT))
        el = time.perf_counter() - t0
        print(f"== unit {i + 1}/{len(units)} {u.name}: MPPI {rec['mppi_normalized_score']:.1f}, policy prior "
              f"{rec['pi_normalized_score']:.1f} (this sitting {el / 60:.0f} min)", flush=True)


def _run_jobs(study, units):
    """--jobs: this process only schedules. A first subprocess collects the datasets and evaluates the teacher
    (--prepare), then one subprocess per unit; every flag that shapes a unit travels with it. This process
    never loads the teacher or steps an environment: collecting 600 episodes leaves a process holding ~9 GB,
    which it would keep while its units run (on 24 GB that drove the machine into swap)."""
    from tdmpc_jax.results_io import claim_output
    out = FLAGS.output
    claim_output(out, "study", FLAGS.overwrite)
    same = [FLAGS[n].serialize() for n in ("teacher", "teacher_mppi", "output", "stage", "block", "steps", "batch_size",
                                           "collect_episodes", "mppi_episodes", "pi_episodes", "eval_workers", "results",
                                           "redo_committed")]
    me, logs, log = [sys.executable, os.path.abspath(__file__)], os.path.join(out, "logs"), lambda m: print(m, flush=True)
    codes = study.run_parallel([("prepare", [*me, "--prepare", f"--only={','.join(u.name for u in units)}", *same])],
                               1, logs, log=log)
    if codes["prepare"]:
        raise RuntimeError(f"collecting the data or evaluating the teacher failed (see {os.path.join(logs, 'prepare.log')})")
    codes = study.run_parallel([(u.name, [*me, f"--only={u.name}", *same]) for u in units], FLAGS.jobs, logs, log=log)
    failed = [n for n, c in codes.items() if c]
    if failed:
        raise RuntimeError(f"{len(failed)} unit(s) failed: {', '.join(failed)} (see {logs})")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    cli.run(main)
