"""The distillation study's units: resumable, skip finished parts, and a report rebuilt from them."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tdmpc_jax import study

from conftest import REPO

TASKS = ("cartpole-balance", "pendulum-spin")
# MPPI with fewer samples and iterations than the official settings (the study's default, checked below): these
# tests check the machinery, and the official planner costs ~10x more per step
SMOKE_MPPI = (("num_samples", 64), ("num_elites", 8), ("iterations", 2))
SCFG = study.StudyConfig(steps=12, batch_size=16, collect_episodes=1, pi_episodes=2, mppi_episodes=1, tasks=TASKS,
                         planner=SMOKE_MPPI)


@pytest.fixture(scope="module")
def teacher():
    import tdmpc_jax
    return tdmpc_jax.load_checkpoint(os.path.join(REPO, "checkpoints", "teacher-mt4"))  # small: fast compiles


@pytest.fixture()
def tiny(monkeypatch):
    monkeypatch.setitem(study.SIZES, "tiny", "16,32,16")
    monkeypatch.setattr(study, "MAIN_SIZE", "tiny")


def test_units_resume_and_report(tiny, teacher, tmp_path, monkeypatch):
    out, dest = str(tmp_path / "study"), str(tmp_path / "results")
    ds = study.ensure_data(out, teacher, SCFG)
    assert ds.num_episodes == len(TASKS) and os.path.exists(os.path.join(out, "data", "DONE"))
    recs = {}
    for arm in ("scratch", "reward"):
        recs[arm] = study.run_unit(out, study.Unit("tiny", arm, 1), teacher, ds, SCFG, REPO, log=lambda m: None)
    d = os.path.join(out, "runs", "tiny-reward-s1")
    for f in ("unit.json", "DONE", "train/agent/DONE", "eval_pi/results.json", "eval_mppi/results.json"):
        assert os.path.exists(os.path.join(d, f)), f
    assert recs["reward"]["uses_teacher"] and not recs["scratch"]["uses_teacher"]
    assert recs["reward"]["coefficients"] == {"distill_coef": 0.4}
    assert recs["reward"]["learnable_params"] == recs["scratch"]["learnable_params"]
    mppi = json.load(open(os.path.join(d, "eval_mppi", "results.json")))
    assert (mppi["planner"]["iterations"], mppi["planner"]["num_samples"]) == (2, 64)  # the smoke settings
    from tdmpc_jax.planner import PlannerConfig
    assert study.StudyConfig().mppi() == PlannerConfig() == PlannerConfig(iterations=6, num_samples=512)  # the study's
    assert mppi["eval_mode"] is False and sorted(mppi["tasks"]) == sorted(TASKS)
    assert mppi["timing"]["resumable_groups"]  # on a CPU the MPPI evaluation resumes group by group
    assert os.path.exists(os.path.join(d, "eval_mppi", "partial", "spec.json"))

    # a finished unit is never redone; a unit killed after training redoes only what is missing (here: its
    # MPPI evaluation's groups are all there, so it only rebuilds the result from them)
    metrics = os.path.join(d, "train", "metrics.jsonl")
    before = os.path.getmtime(metrics)
    assert study.run_unit(out, study.Unit("tiny", "reward", 1), teacher, ds, SCFG, REPO) == recs["reward"]
    os.remove(os.path.join(d, "DONE"))
    os.remove(os.path.join(d, "eval_mppi", "results.json"))
    again = study.run_unit(out, study.Unit("tiny", "reward", 1), teacher, ds, SCFG, REPO, log=lambda m: None)
    assert os.path.getmtime(metrics) == before
    assert again["mppi_normalized_score"] == pytest.approx(recs["reward"]["mppi_normalized_score"])

    # a sitting ends with the unit trained, its policy prior evaluated and its MPPI evaluation's groups kept
    # (not finished): the report's directory carries it, and a fresh study directory evaluates on from there
    ended, carry_dest = str(tmp_path / "ended"), str(tmp_path / "carry")
    shutil.copytree(out, ended)
    for f in ("DONE", "eval_mppi/results.json"):
        os.remove(os.path.join(ended, "runs", "tiny-reward-s1", f))
    assert study.carry_unfinished(ended, carry_dest) == {"tiny-reward-s1": {"trained": True, "pi": True,
                                                                            "mppi_groups": 1}}
    src = os.path.join(carry_dest, study.INFLIGHT, "tiny-reward-s1")
    assert os.path.exists(os.path.join(src, "train", "agent", "DONE"))
    assert not os.path.exists(os.path.join(src, "train", "train_state"))  # the student, not the optimizer
    assert not os.path.exists(os.path.join(src, "DONE"))
    inflight = os.path.join(carry_dest, study.INFLIGHT)
    next_sitting = str(tmp_path / "next")
    resumed = study.run_unit(next_sitting, study.Unit("tiny", "reward", 1), teacher, ds, SCFG, REPO, log=lambda m: None,
                             carried=inflight)
    d2 = os.path.join(next_sitting, "runs", "tiny-reward-s1")
    assert not os.path.exists(os.path.join(d2, "train", "train_state"))  # not trained again
    assert open(os.path.join(d2, "train", "metrics.jsonl")).read() == open(metrics).read()
    for k in ("mppi_normalized_score", "pi_normalized_score", "train_s_per_update", "git_commit"):
        assert resumed[k] == recs["reward"][k], k
    # finished now: carrying again drops it from the report's directory
    assert study.carry_unfinished(next_sitting, carry_dest, finished=["tiny-reward-s1"]) == {}
    assert not os.path.exists(src)
    # a carried directory that names another unit is refused before anything is copied
    bad = os.path.join(inflight, "tiny-scratch-s1")
    shutil.copytree(os.path.join(ended, "runs", "tiny-reward-s1"), bad)
    with pytest.raises(ValueError, match="tiny-scratch-s1/unit.json: not a carried study unit"):
        study.run_unit(str(tmp_path / "other"), study.Unit("tiny", "scratch", 1), teacher, ds, SCFG, REPO,
                       log=lambda m: None, carried=inflight)
    assert not os.path.exists(str(tmp_path / "other" / "runs" / "tiny-scratch-s1"))

    # a sitting ends in the middle of a unit's training (killed after its checkpoint at update 5): the report's
    # directory carries that checkpoint, and the next sitting trains on from it to the uninterrupted student
    from tdmpc_jax import offline
    real_save = offline.save_state

    def killed_after_5(out_dir, state, *a, **k):
        real_save(out_dir, state, *a, **k)
        if int(state.step) == 5:
            raise KeyboardInterrupt("the sitting ends")
    cut, carry2 = str(tmp_path / "cut"), str(tmp_path / "carry2")
    monkeypatch.setattr(offline, "save_state", killed_after_5)
    with pytest.raises(KeyboardInterrupt):
        study.run_unit(cut, study.Unit("tiny", "reward", 1), teacher, ds, SCFG, REPO, log=lambda m: None)
    monkeypatch.setattr(offline, "save_state", real_save)
    assert study.carry_unfinished(cut, carry2) == {"tiny-reward-s1": {"trained": False, "updates": 5}}
    src2 = os.path.join(carry2, study.INFLIGHT, "tiny-reward-s1")
    assert sorted(os.listdir(src2)) == ["train", "unit.json"]
    assert sorted(os.listdir(os.path.join(src2, "train"))) == ["metrics.jsonl", "train_state"]
    assert study.carry_unfinished(cut, carry2) == {}  # no further on than what is carried: left as it is
    logs = []
    resumed = study.run_unit(str(tmp_path / "next2"), study.Unit("tiny", "reward", 1), teacher, ds, SCFG, REPO,
                             log=logs.append, carried=os.path.join(carry2, study.INFLIGHT))
    assert "training resumes at update 5" in logs[0]
    import jax
    import tdmpc_jax
    one = tdmpc_jax.load_checkpoint(os.path.join(d, "train", "agent"))
    two = tdmpc_jax.load_checkpoint(os.path.join(tmp_path, "next2", "runs", "tiny-reward-s1", "train", "agent"))
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params)):
        np.testing.assert_array_equal(a, b)  # bitwise the uninterrupted unit's student
    for k in ("mppi_normalized_score", "pi_normalized_score", "git_commit"):
        assert resumed[k] == recs["reward"][k], k
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "next2", "runs", "tiny-reward-s1", "train",
                                                     "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, SCFG.steps + 1))  # the log goes on where it was cut
    el = [r["elapsed_s"] for r in rows]
    assert el == sorted(el) and resumed["train_s_per_update"] == pytest.approx(el[-1] / SCFG.steps)
    # a carried unit with neither a student nor a training checkpoint is refused
    shutil.rmtree(os.path.join(src2, "train", "train_state"))
    with pytest.raises(ValueError, match="neither its trained student"):
        study.check_carried(src2, "tiny-reward-s1")

    teacher_mppi = json.load(open(os.path.join(REPO, "tests", "data", "reference", "released_1M_mppi_mt30_10ep.json")))
    s = study.report(out, dest, teacher_mppi, None, teacher.num_params()["learnable"])
    assert set(s["groups"]) == {"tiny/scratch", "tiny/reward"}
    g = s["groups"]["tiny/reward"]
    lo, hi = g["mppi"]["mean_ci95"]
    assert lo <= g["mppi"]["mean"] <= hi and g["mppi"]["runs"] == 1
    p = s["improvement"]["tiny/reward > scratch"]["mppi"]["p"]
    assert 0.0 <= p <= 1.0
    for f in ("summary.json", "summary.md", "score_vs_params.png", "per_task_tiny.png", "arms_tiny.png",
              "runs/tiny-reward-s1.json"):
        assert os.path.getsize(os.path.join(dest, f)) > 0, f
    md = open(os.path.join(dest, "summary.md")).read()  # one seed per arm: no point interval passed off as a CI
    assert md.count("(one seed: no CI)") == 2 * 3 + 2 and f"{g['mppi']['mean']:.1f} [" not in md
    assert s["improvement"]["tiny/reward > scratch"]["runs"] == [1, 1]
    import tdmpc_jax  # the main comparison's students are committed as Orbax checkpoints
    assert tdmpc_jax.load_checkpoint(os.path.join(dest, "students", "tiny-reward-s1")).num_params()["learnable"] == \
        recs["reward"]["learnable_params"]

    # what limits the students: coverage over every finished unit, fit of the committed students
    diag = study.diagnose(out, dest, teacher, teacher_mppi, per_task=8)
    assert set(diag["fit"]["per_arm"]) == {"teacher", "scratch", "reward"}
    assert diag["fit"]["students"] == ["tiny-reward-s1", "tiny-scratch-s1"]
    assert diag["fit"]["per_arm"]["teacher"]["pi_mse_teacher"] == 0.0
    own = diag["own_states"]["per_arm"]
    assert set(own) == {"teacher", "scratch", "reward"} and own["teacher"]["pi_mse_teacher_own"] == 0.0
    assert own["reward"]["pi_mse_teacher_data"] == diag["fit"]["per_arm"]["reward"]["pi_mse_teacher"]
    assert own["scratch"]["pi_mse_teacher_own"] > 0.0 and "own states" in open(os.path.join(dest, "diagnosis.md")).read()
    assert set(diag["coverage"]["arms"]) == {"scratch", "reward"} and sorted(diag["coverage"]["tasks"]) == sorted(TASKS)
    for f in ("diagnosis.json", "diagnosis.md", "coverage.png"):
        assert os.path.getsize(os.path.join(dest, f)) > 0, f
    with pytest.raises(ValueError, match="no finished study dataset"):
        study.diagnose(str(tmp_path / "nodata"), dest, teacher, teacher_mppi)

    # a fresh study directory (a fresh clone, another machine): the units' directories are gone, their
    # committed per-run JSON is not, and the report rebuilt from it is the same report
    fresh = str(tmp_path / "fresh")
    assert study.report(fresh, dest, teacher_mppi, None, teacher.num_params()["learnable"]) == s
    assert [u.name for u, *_ in study.committed_units(dest, skip={"tiny-scratch-s1"})] == ["tiny-reward-s1"]
    # a unit's own directory wins over its committed record
    with open(os.path.join(dest, "runs", "tiny-reward-s1.json")) as f:
        rec = json.load(f)
    rec["mppi_tasks"] = {t: 0.0 for t in rec["mppi_tasks"]}
    with open(os.path.join(dest, "runs", "tiny-reward-s1.json"), "w") as f:
        json.dump(rec, f)
    assert study.report(out, dest, teacher_mppi, None, teacher.num_params()["learnable"]) == s

    # the teacher's policy-prior line: this study directory's evaluation until a report commits it, then the
    # committed one, whatever another machine's evaluation says
    dest_pi = str(tmp_path / "results_pi")
    assert study.teacher_pi_evaluation(out, dest_pi) is None
    here = os.path.join(out, "teacher", "eval_pi", "results.json")
    os.makedirs(os.path.dirname(here))
    with open(here, "w") as f:
        json.dump({"normalized_score": 17.0, "tasks": {}}, f)
    s_pi = study.report(out, dest_pi, teacher_mppi, study.teacher_pi_evaluation(out, dest_pi),
                        teacher.num_params()["learnable"])
    assert s_pi["teacher"]["pi_normalized_score"] == 17.0
    assert json.load(open(os.path.join(dest_pi, study.TEACHER_PI)))["normalized_score"] == 17.0
    with open(here, "w") as f:
        json.dump({"normalized_score": 16.9, "tasks": {}}, f)
    assert study.teacher_pi_evaluation(out, dest_pi)["normalized_score"] == 17.0
    assert study.teacher_pi_evaluation(out, dest)["normalized_score"] == 16.9  # nothing committed there
    assert study.report(fresh, dest_pi, teacher_mppi, study.teacher_pi_evaluation(fresh, dest_pi),
                        teacher.num_params()["learnable"]) == s_pi
    for bad in ("{not json", "[]", json.dumps({"normalized_score": "17"})):  # one error line, before any work
        with open(os.path.join(dest_pi, study.TEACHER_PI), "w") as f:
            f.write(bad)
        with pytest.raises(ValueError, match="teacher_pi.json: not an evaluation's results.json"):
            study.teacher_pi_evaluation(out, dest_pi)
    os.remove(here)
    for bad in ("{not json", json.dumps({**rec, "unit": {**rec["unit"], "seed": 2}}), json.dumps({"unit": rec["unit"]})):
        with open(os.path.join(dest, "runs", "tiny-reward-s1.json"), "w") as f:
            f.write(bad)
        with pytest.raises(ValueError, match="tiny-reward-s1.json: not a per-run record"):
            study.report(fresh, dest, teacher_mppi, None, teacher.num_params()["learnable"])

    # stage 4's data: the teacher's MPPI episodes in their own directory; its units are grouped apart and
    # compared with scratch on the same data and with their arm on the policy-prior data (the units above)
    mds = study.ensure_data(out, teacher, SCFG, data="mppi")
    done = json.load(open(os.path.join(out, "data-mppi", "DONE")))
    assert mds.path != ds.path and "MPPI" in done["acting"] and mds.num_episodes == len(TASKS)
    assert not np.array_equal(np.asarray(mds.arrays["action"][1:50]), np.asarray(ds.arrays["action"][1:50]))
    mppi_units = [study.Unit("tiny", "scratch", 1, "mppi"), study.Unit("tiny", "reward", 1, "mppi")]
    for u in mppi_units:
        study.run_unit(out, u, teacher, mds, SCFG, REPO, log=lambda m: None)
    assert json.load(open(os.path.join(out, "runs", "tiny-reward-mppi-s1", "unit.json")))["unit"]["data"] == "mppi"
    dest4 = str(tmp_path / "results4")
    s4 = study.report(out, dest4, teacher_mppi, None, teacher.num_params()["learnable"])
    assert set(s4["groups"]) == {"tiny/scratch", "tiny/reward", "tiny/scratch@mppi", "tiny/reward@mppi"}
    assert set(s4["improvement"]) == {"tiny/reward > scratch", "tiny/reward@mppi > scratch@mppi",
                                      "tiny/reward@mppi > reward", "tiny/scratch@mppi > scratch"}
    assert s4["groups"]["tiny/reward"] == s["groups"]["tiny/reward"]
    assert os.path.isdir(os.path.join(dest4, "students", "tiny-reward-mppi-s1"))
    assert [u.name for u, *_ in study.committed_units(dest4)] == sorted(
        ["tiny-scratch-s1", "tiny-reward-s1"] + [u.name for u in mppi_units])

    # stage 5's data, one DAgger round: the pi data, then the episodes a committed student plays with its own
    # sampled policy prior (seed 2), in that order; a student that is not there stops it before any episode
    from tdmpc_jax.data import Dataset
    monkeypatch.setitem(study.DATA, "dagger", {**study.DATA["dagger"], "actor": "tiny-reward-s1", "episodes": 1})
    with pytest.raises(ValueError, match="nope-s1.tiny-reward-s1: the student that acts"):
        study.ensure_data(out, teacher, SCFG, data="dagger", students=str(tmp_path / "nope-s1"))
    assert not os.path.exists(os.path.join(out, "data-dagger"))
    dds = study.ensure_data(out, teacher, SCFG, data="dagger", students=os.path.join(dest, "students"))
    done5 = json.load(open(os.path.join(out, "data-dagger", "DONE")))
    assert dds.num_episodes == 2 * len(TASKS) and done5["returns"] and "1 episodes per task of the student tiny-reward-s1" \
        in done5["acting"]
    n = ds.num_steps
    for k in ("obs", "reward", "task"):
        assert np.array_equal(np.asarray(dds.arrays[k][:n]), np.asarray(ds.arrays[k]), equal_nan=True), k
    own = Dataset(os.path.join(out, "data-dagger.added"))
    assert np.array_equal(np.asarray(dds.arrays["obs"][n:]), np.asarray(own.arrays["obs"]))
    assert not np.array_equal(np.asarray(own.arrays["obs"][1:50]), np.asarray(ds.arrays["obs"][1:50]))
    monkeypatch.setitem(study.DATA, "more", {**study.DATA["more"], "episodes": 1})
    more = study.ensure_data(out, teacher, SCFG, data="more")  # its control: the teacher acts (seed 2)
    assert more.num_episodes == dds.num_episodes and np.array_equal(np.asarray(more.arrays["obs"][:n]),
                                                                   np.asarray(ds.arrays["obs"]))
    added = np.asarray(more.arrays["obs"][n:])
    assert not np.array_equal(added, np.asarray(own.arrays["obs"])) and not np.array_equal(added[:50], ds.arrays["obs"][:50])
    for d, data in (("dagger", dds), ("more", more)):
        study.run_unit(out, study.Unit("tiny", "reward", 1, d), teacher, data, SCFG, REPO, log=lambda m: None)
    s5 = study.report(out, str(tmp_path / "results5"), teacher_mppi, None, teacher.num_params()["learnable"])
    assert {"tiny/reward@dagger > reward", "tiny/reward@dagger > reward@more", "tiny/reward@more > reward"} <= \
        set(s5["improvement"])

    # stage 6's, a second round: round 1's data (made first where it is not there, its student looked up in the
    # same students directory) plus the episodes of a round-1 student, collection seed 3
    students5 = str(tmp_path / "results5" / "students")
    monkeypatch.setitem(study.DATA, "dagger2", {**study.DATA["dagger2"], "actor": "tiny-reward-dagger-s1", "episodes": 1})
    out2 = str(tmp_path / "study2")
    shutil.copytree(os.path.join(out, "data"), os.path.join(out2, "data"))
    d2 = study.ensure_data(out2, teacher, SCFG, data="dagger2", students=students5)
    assert os.path.exists(os.path.join(out2, "data-dagger", "DONE")) and d2.num_episodes == 3 * len(TASKS)
    round1 = Dataset(os.path.join(out2, "data-dagger"))
    assert np.array_equal(np.asarray(round1.arrays["obs"]), np.asarray(dds.arrays["obs"]))  # the same round 1
    assert np.array_equal(np.asarray(d2.arrays["obs"][:dds.num_steps]), np.asarray(dds.arrays["obs"]))
    assert "student tiny-reward-dagger-s1's sampled policy prior (eval_mode=False, seed 3)" in \
        json.load(open(os.path.join(out2, "data-dagger2", "DONE")))["acting"]
    study.run_unit(out2, study.Unit("tiny", "reward", 1, "dagger2"), teacher, d2, SCFG, REPO, log=lambda m: None)
    for d in ("dagger", "more"):
        shutil.copytree(os.path.join(out, "runs", f"tiny-reward-{d}-s1"), os.path.join(out2, "runs", f"tiny-reward-{d}-s1"))
    s6 = study.report(out2, str(tmp_path / "results6"), teacher_mppi, None, teacher.num_params()["learnable"])
    assert {"tiny/reward@dagger2 > reward@dagger"} <= set(s6["improvement"])

    # how new each added set's states are: every added set against every dataset that does not hold it
    nov = study.data_novelty(out, str(tmp_path / "novelty"), per_task=16)
    assert set(nov["pairs"]) == {"dagger|pi", "dagger|more", "dagger|mppi", "more|pi", "more|dagger", "more|mppi"}
    assert nov["pairs"]["more|pi"]["actor"] == "teacher" and sorted(nov["tasks"]) == sorted(TASKS)
    nov2 = study.data_novelty(out2, str(tmp_path / "novelty2"), per_task=16)
    assert set(nov2["pairs"]) == {"dagger|pi", "dagger2|pi", "dagger2|dagger"}
    assert nov2["pairs"]["dagger|pi"]["tasks"] != nov2["pairs"]["dagger2|pi"]["tasks"]
    for f in ("novelty.json", "novelty.md", "novelty.png"):
        assert os.path.getsize(os.path.join(tmp_path, "novelty2", f)) > 0, f
    with pytest.raises(ValueError, match="no finished added dataset"):
        study.data_novelty(str(tmp_path / "fresh"), str(tmp_path / "novelty3"))
    assert study.holds("dagger2", "pi") and study.holds("dagger2", "dagger") and not study.holds("dagger", "more")


def test_diagnosis_measures_on_aligned_transitions(teacher, tmp_path):
    """The fit is measured at (obs_t, action_t, reward_t) of one transition (an off-by-one would pair an
    observation with the next step's action and reward), equally many per task; the teacher agrees with
    itself; coverage's fractions and rank correlations follow their definitions."""
    from tdmpc_jax import diagnosis
    ds = study.ensure_data(str(tmp_path / "study"), teacher, SCFG)
    obs, action, reward, task = diagnosis.sample_transitions(ds, 16, seed=3)
    assert np.unique(task, return_counts=True)[1].tolist() == [16] * len(TASKS)
    rows = {ds.arrays["obs"][i].tobytes(): i for i in range(ds.num_steps)}
    for o, a, r in zip(obs, action, reward):
        i = rows[o.tobytes()]  # the next row holds the action taken at this observation and its reward
        assert np.array_equal(ds.arrays["action"][i + 1], a) and ds.arrays["reward"][i + 1] == r
    fits = diagnosis.fit({"same": teacher}, teacher, ds, per_task=16)
    assert fits["same"] == fits["teacher"]
    assert all(v["pi_mse_teacher"] == 0.0 and v["reward_mae"] >= 0 for v in fits["teacher"].values())
    summ = diagnosis.summarize_fit(fits)
    assert summ["same"]["tasks_reward_mae_below_teacher"] == 0 and summ["same"]["tasks"] == len(TASKS)
    # where an agent acts: its own policy-prior episodes (the study's protocol: eval mode), the teacher's heads
    # measured on the same states; an agent identical to the teacher plays the teacher's episodes
    from tdmpc_jax.evaluation import evaluate
    from tdmpc_jax.planner import PlannerConfig
    own = diagnosis.own_states({"same": teacher}, teacher, TASKS, episodes=1, per_task=16)
    assert own["same"] == own["teacher"] and own["same"]["agent"] == own["same"]["teacher"]
    ev = evaluate(teacher, TASKS, 1, 0, PlannerConfig(mpc=False), eval_mode=True, progress=False)
    assert own["same"]["returns"] == pytest.approx({t: ev["tasks"][t]["mean"] for t in TASKS})
    assert all(v["pi_mse_teacher"] == 0.0 for v in own["same"]["agent"].values())
    summ_own = diagnosis.summarize_own_states(own, {**fits, "same": fits["teacher"]})
    assert summ_own["same"]["pi_mse_teacher_own"] == 0.0 and summ_own["same"]["tasks"] == len(TASKS)
    assert summ_own["same"]["reward_mae_own"] == summ_own["same"]["teacher_reward_mae_own"]
    ref = {"tasks": {"a": {"mean": 100.0}, "b": {"mean": 300.0}, "c": {"mean": 600.0}}}
    cov = diagnosis.coverage({"a": 50.0, "b": 100.0, "c": 200.0}, ref, {"x": np.array([[1.0, 2.0, 4.0], [3.0, 4.0, 8.0]])},
                             ["a", "b", "c"])
    assert cov["arms"]["x"]["of_data"] == pytest.approx((20 + 30 + 60) / 350) and cov["data_of_teacher"] == pytest.approx(0.35)
    assert cov["arms"]["x"]["spearman_data"] == pytest.approx(1.0) and cov["tasks"]["c"]["x"] == pytest.approx(60.0)


def _grid_dataset(path, values, tasks=TASKS):
    """A dataset whose every task holds one episode with observations (v, 7) for v in `values`."""
    from tdmpc_jax.data import DatasetWriter
    w = DatasetWriter(path, obs_dim=2, action_dim=1, tasks=list(tasks))
    for i in range(len(tasks)):
        obs = np.stack([np.asarray(values, np.float32), np.full(len(values), 7.0, np.float32)], 1)
        w.add_episode(obs, np.zeros((len(values), 1)), np.zeros(len(values)), i)
    return w.close()


def test_novelty_is_the_distance_to_the_nearest_base_state(tmp_path):
    """Exact nearest distances (as scipy's cdist); added states already in the base are 0 away; states
    between the base's grid points lie half a step away, in units of the scale's std; constant dims count
    for nothing."""
    from scipy.spatial.distance import cdist
    from tdmpc_jax import diagnosis
    rng = np.random.default_rng(0)
    q, b = rng.normal(size=(300, 5)), rng.normal(size=(700, 5))
    assert np.allclose(diagnosis.nearest_distance(q, b), cdist(q, b).min(1), atol=1e-9)
    base = _grid_dataset(str(tmp_path / "base"), np.arange(10.0))
    between = _grid_dataset(str(tmp_path / "between"), np.arange(9.0) + 0.5)
    scales = diagnosis.task_scales([base], TASKS)
    assert scales[TASKS[0]][1][1] == 0.0  # the constant dim
    assert diagnosis.novelty(base, base, scales, per_task=8) == {t: 0.0 for t in TASKS}
    got = diagnosis.novelty(base, between, scales, per_task=8)
    assert got == pytest.approx({t: 0.5 / np.std(np.arange(10.0)) for t in TASKS})
    with pytest.raises(ValueError, match="missing from the base"):
        diagnosis.novelty(_grid_dataset(str(tmp_path / "one"), np.arange(3.0), TASKS[:1]), between, scales)


def test_units_with_committed_results_are_not_redone(tmp_path):
    """A unit whose per-run JSON is committed under --results is finished: nothing is collected or run
    (a malformed record is an error before any work)."""
    results, out = tmp_path / "results", tmp_path / "study"
    (results / "runs").mkdir(parents=True)
    name = "0.23M-best-s1"
    for src, to in ((os.path.join("runs", name + ".json"),) * 2, (".tdmpc_jax-output.json",) * 2):
        with open(os.path.join(REPO, "docs", "results", "study", src)) as f:  # a study-results directory
            (results / to).write_text(f.read())
    cmd = [sys.executable, os.path.join(REPO, "experiments", "study.py"), f"--only={name}", f"--results={results}",
           f"--output={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert f"[{name}] finished: committed" in r.stdout and "every unit asked for is finished" in r.stdout
    assert not out.exists()
    (results / "runs" / (name + ".json")).write_text("[]")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode != 0 and lines[-1].startswith("error:") and "not a per-run record" in lines[-1]
    assert not out.exists()


def test_run_parallel_keeps_to_jobs_and_reports_failures(tmp_path):
    """--jobs: units as subprocesses, at most `jobs` at a time, in order, each with its own log."""
    prog = ("import sys, time; open(sys.argv[1], 'a').write(f'start {time.time()}\\n'); time.sleep(0.4); "
            "print('out of', sys.argv[2]); open(sys.argv[1], 'a').write(f'end {time.time()}\\n'); sys.exit(int(sys.argv[3]))")
    cmds = [(f"u{i}", [sys.executable, "-c", prog, str(tmp_path / f"t{i}"), f"u{i}", "3" if i == 2 else "0"])
            for i in range(5)]
    lines = []
    codes = study.run_parallel(cmds, 2, str(tmp_path / "logs"), log=lines.append, poll_s=0.05)
    assert codes == {"u0": 0, "u1": 0, "u2": 3, "u3": 0, "u4": 0}
    spans = [[float(l.split()[1]) for l in open(tmp_path / f"t{i}")] for i in range(5)]
    for t, _ in spans:  # never more than 2 running at once
        assert sum(a <= t < b for a, b in spans) <= 2
    assert max(a for a, _ in spans) > min(b for _, b in spans)  # and the last waited for a slot
    assert "out of u3" in open(tmp_path / "logs" / "u3.log").read()
    assert any("u2" in l and "FAILED (exit 3)" in l for l in lines) and sum("finished" in l for l in lines) == 4
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        study.run_parallel(cmds, 0, str(tmp_path / "logs"))


def test_aggregates_follow_rliable_definitions():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 100, (3, 30))
    agg = study.aggregate({"a": x}, reps=200)["a"]
    both = study.aggregate({"b": rng.uniform(0, 100, (2, 30)), "a": x}, reps=200)
    assert both["a"] == agg  # a group's CI does not depend on the other groups
    assert agg["mean"] == pytest.approx(x.mean())
    flat = np.sort(x.reshape(-1))
    assert agg["iqm"] == pytest.approx(flat[len(flat) // 4: len(flat) - len(flat) // 4].mean())
    better = study.probability_of_improvement(x + 50, x, reps=200)
    assert better["p"] > 0.8 and better["ci95"][0] <= better["p"] <= better["ci95"][1]


def test_improvement_probability_is_rliables():
    """The vectorized P(X > Y) of the report equals rliable's (scipy's Mann-Whitney per task), ties,
    identical columns and unequal run counts included."""
    from rliable import metrics
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, (3, 12)).astype(float)            # small integers: many ties
    y = rng.integers(0, 4, (2, 12)).astype(float)
    x2 = x[:2].copy()
    x2[:, :3] = y[:, :3]                                    # identical columns: rliable's 0.5 branch
    for a, b in ((x, y), (y, x), (x2, y), (rng.uniform(0, 100, (3, 30)), rng.uniform(0, 100, (2, 30)))):
        assert study.improvement_probability(a, b) == pytest.approx(metrics.probability_of_improvement(a, b), abs=1e-12)


def test_stages_and_bad_flags():
    s1 = study.stage_units(1)
    assert len(s1) == 9 and {u.size for u in s1} == {study.MAIN_SIZE}
    assert [u.seed for u in s1[:3]] == [1, 1, 1]  # seed-major: every arm once before the next seed
    s2 = study.stage_units(2)
    assert {u.size for u in s2} >= {"0.1M", "0.35M", "0.67M", "1.4M"}
    assert {u.arm for u in s2 if u.size == "1.4M"} == {"scratch", "reward", "plan"}
    assert {u.arm for u in s2 if u.size == study.MAIN_SIZE} == {"reward+policy", "reward+q", "reward+kl",
                                                               "reward+policy+repr", "all"}
    assert [(u.arm, u.seed) for u in study.stage_units(3)] == [("plan", 1), ("plan", 2), ("plan", 3)]
    s4 = study.stage_units(4)
    assert len(s4) == 8 and {(u.size, u.data) for u in s4} == {(study.MAIN_SIZE, "mppi")}
    assert {u.arm for u in s4} == {"scratch", "reward", "plan", "plan+action"} and s4[0].name == "0.23M-scratch-mppi-s1"
    s5 = study.stage_units(5)
    assert {u.size for u in s5} == {study.MAIN_SIZE}
    assert {u.data for u in s5} == {"dagger", "more"} and len(s5) == 2 * 2 * len(study.DAGGER_ARMS)
    assert s5[2].name == "0.23M-reward+policy-dagger-s1" and study.DATA["dagger"]["actor"] in \
        {u.name for u in s1}  # the acting student is one the report commits
    assert study.DATA["more"]["actor"] == "teacher" and study.DATA["more"]["episodes"] == study.DATA["dagger"]["episodes"]
    s6 = study.stage_units(6)  # the second DAgger round: round 1's data plus the states of its best student
    assert {(u.size, u.data) for u in s6} == {(study.MAIN_SIZE, "dagger2")} and len(s6) == 2 * len(study.DAGGER2_ARMS)
    assert study.DATA["dagger2"]["with"] == "dagger" and study.DATA["dagger2"]["actor"] in {u.name for u in s5}
    assert len({study.DATA[d]["seed"] for d in ("dagger", "dagger2")}) == 2  # other episodes' initial states
    with pytest.raises(ValueError, match=f"stage must be 1-{study.STAGES}"):
        study.stage_units(study.STAGES + 1)
    for u in s1 + s2 + s4 + s5 + s6:  # unit names parse back to their units
        assert study.parse_unit_name(u.name) == u
    for bad in ("0.23M-plan-s", "0.23M-plan-gpu-s1", "0.5M-plan-s1", "0.23M-nope-s1"):
        with pytest.raises(ValueError, match="is not a unit name"):
            study.parse_unit_name(bad)
    for arm in study.ARMS:  # every arm is a valid TrainConfig
        tc = study.train_config(arm, 32)
        assert tc.uses_teacher == (arm != "scratch")
    plan = study.train_config("plan", 32)
    assert plan.value_coef == 0.0 and plan.coef("distill_plan_rank_coef") == 10.0
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "study.py"), "--only=bogus-unit"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and "bogus-unit" in lines[-1]


def test_novelty_without_added_data_is_one_error_line_and_writes_nothing(tmp_path):
    res = tmp_path / "results"
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "study.py"), "--novelty",
                        f"--output={tmp_path}", f"--results={res}"], capture_output=True, text=True, timeout=300,
                       cwd=REPO, env={**os.environ, "MUJOCO_GL": "disable"})
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 1 and lines == [f"error: {tmp_path}: no finished added dataset (stages 5 and 6 make them)"]
    assert not res.exists()


def test_a_bad_carried_unit_is_one_error_line_before_any_work(tmp_path):
    from tdmpc_jax.results_io import claim_output
    res, out = tmp_path / "results", tmp_path / "out"
    claim_output(str(res), "study-results")
    carried = res / study.INFLIGHT / "0.67M-plan-s1"
    carried.mkdir(parents=True)
    (carried / "unit.json").write_text(json.dumps({"unit": {"size": "0.67M", "arm": "reward", "seed": 1}}))

    def run():
        r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "study.py"), "--stage=2",
                            "--only=0.67M-plan-s1", f"--output={out}", f"--results={res}"], capture_output=True,
                           text=True, timeout=300, cwd=REPO, env={**os.environ, "MUJOCO_GL": "disable"})
        return r.returncode, [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert run() == (1, [f"error: {carried / 'unit.json'}: not a carried study unit (ValueError: its "
                         "unit is '0.67M-reward-s1', not '0.67M-plan-s1')"])
    assert not out.exists() and (carried / "unit.json").exists()
    # the right unit, carried in training, but its checkpoint is not a train state
    (carried / "unit.json").write_text(json.dumps({"unit": {"size": "0.67M", "arm": "plan", "seed": 1}}))
    state = carried / "train" / "train_state"
    state.mkdir(parents=True)
    (state / "metadata").write_text("{}")
    rc, lines = run()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"error: {state}: not a train state"), lines
    assert not out.exists() and (state / "metadata").read_text() == "{}"


def test_run_parallel_stopped_by_sigterm_stops_its_commands(tmp_path):
    """`timeout` or a scheduler ends the study with SIGTERM: the units it started end with it."""
    import signal
    import time
    pidfile = tmp_path / "child.pid"
    (tmp_path / "child.py").write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                                       "time.sleep(60)\n")
    (tmp_path / "parent.py").write_text(
        f"import sys\nsys.path.insert(0, {REPO!r})\nfrom tdmpc_jax import study\n"
        f"study.run_parallel([('u', [sys.executable, {str(tmp_path / 'child.py')!r}])], 1, "
        f"{str(tmp_path / 'logs')!r}, poll_s=0.05)\n")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")])
    for _ in range(600):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) != 0
    with pytest.raises(ProcessLookupError):  # terminated and reaped by the parent: gone
        for _ in range(100):
            os.kill(child, 0)
            time.sleep(0.05)


def test_dims_label_names_the_architecture_a_unit_trains():
    """The report's dims column: a student's own 'enc,mlp,latent', and the official size's dims (not '1')."""
    from tdmpc_jax.config import student_config
    for size in study.SIZES:
        cfg = student_config(study.SIZES[size], task_set="mt30")
        label = study.dims_label(size)
        assert label.split(" ")[0] == f"{cfg.enc_dim},{cfg.mlp_dim},{cfg.latent_dim}", (size, label)
    assert study.dims_label("1.4M") == "256,384,128 (official size 1)"
