"""Every entry point refuses bad input up front: one `error: <what>: <problem>` line, exit status 1, no
traceback, within seconds (before any collection, compile or training), and nothing of the user's touched.

One table of (script, flags, expected words), each row run as a subprocess with the working directory set to
a user's project folder (holding sub/thesis.tex) whose every file is compared before and after.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax.data import Dataset, DatasetError, DatasetWriter
from tdmpc_jax.results_io import MARKER, OutputError, check_output, claim_output

from conftest import REPO

TEACHER = os.path.join(REPO, "checkpoints", "teacher-mt4")
TEACHER_TASKS = ["cartpole-balance", "cartpole-swingup", "pendulum-spin", "finger-spin"]
SCRIPTS = sorted(n[:-3] for n in os.listdir(os.path.join(REPO, "experiments")) if n.endswith(".py"))
FAST_S = 60  # imports + flag parsing (+ opening a checkpoint / dataset) on a busy 2-core machine; no compile
ENV = dict(os.environ, JAX_PLATFORMS="cpu", MUJOCO_GL="disable")


def write_dataset(path, episodes=4, T=40, seed=0):
    """A small dataset with teacher-mt4's dims and task list (obs 9, action 2), random but sane values."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, 9, 2, TEACHER_TASKS) as w:
        for e in range(episodes):
            act = rng.uniform(-1, 1, (T + 1, 2)).astype(np.float32)
            rew = rng.uniform(0, 1, T + 1).astype(np.float32)
            act[0], rew[0] = np.nan, np.nan
            w.add_episode(rng.normal(size=(T + 1, 9)).astype(np.float32), act, rew, e % len(TEACHER_TASKS))
    return str(path)


def _patch(src, dst, name, row, value, dtype=np.float32, width=None):
    shutil.copytree(src, dst)
    a = np.memmap(os.path.join(dst, f"{name}.bin"), dtype=dtype, mode="r+")
    a[row * (width or 1)] = value
    a.flush()
    del a
    return str(dst)


def _patch_meta(src, dst, **changes):
    shutil.copytree(src, dst)
    m = json.load(open(os.path.join(dst, "meta.json")))
    for k, v in changes.items():
        if v is KeyError:
            del m[k]
        else:
            m[k] = v
    json.dump(m, open(os.path.join(dst, "meta.json"), "w"))
    return str(dst)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A user's project folder (the working directory of every run) plus inputs the table refers to."""
    root = tmp_path_factory.mktemp("cli")
    proj = root / "project"
    (proj / "sub").mkdir(parents=True)
    (proj / "sub" / "thesis.tex").write_text("my thesis\n")
    (proj / "notes.txt").write_text("notes\n")
    (proj / "old.gif").write_bytes(b"GIF89a not ours")
    ds = write_dataset(root / "ds")
    bad = root / "bad"
    bad.mkdir()
    paths = {"proj": str(proj), "ds": ds, "new": str(root / "new"), "file": str(proj / "notes.txt"),
             "nan_obs": _patch(ds, bad / "nan_obs", "obs", 5, np.nan, width=9),
             "big_obs": _patch(ds, bad / "big_obs", "obs", 7, 3e38, width=9),
             "inf_obs": _patch(ds, bad / "inf_obs", "obs", 7, np.inf, width=9),
             "nan_action": _patch(ds, bad / "nan_action", "action", 5, np.nan, width=2),
             "inf_reward": _patch(ds, bad / "inf_reward", "reward", 5, np.inf),
             "task_change": _patch(ds, bad / "task_change", "task", 5, 1, np.int32),
             "v99": _patch_meta(ds, bad / "v99", version=99),
             "no_obs_dim": _patch_meta(ds, bad / "no_obs_dim", obs_dim=KeyError),
             "str_steps": _patch_meta(ds, bad / "str_steps", num_steps=str(164)),
             "str_tasks": _patch_meta(ds, bad / "str_tasks", tasks="cartpole-balance"),
             "bool_dim": _patch_meta(ds, bad / "bool_dim", action_dim=True),
             "bad_set": _patch_meta(ds, bad / "bad_set", task_set="mt99")}
    # a pipeline output of ours whose data/ is not a dataset; a quantize output of ours whose fp16/ is foreign
    for name, kind, sub in (("pipe", "pipeline", "data"), ("quant", "quantize", "fp16")):
        claim_output(root / name, kind)
        (root / name / sub).mkdir()
        (root / name / sub / "keep.txt").write_text("mine\n")
        paths[name] = str(root / name)
    return paths


def _snapshot(*dirs):
    out = {}
    for d in dirs:
        for r, _, files in os.walk(d):
            out[r] = None
            for f in files:
                st = os.stat(os.path.join(r, f))
                out[os.path.join(r, f)] = (st.st_size, st.st_mtime_ns)
    return out


# (script, flags, words the error line must contain). {name} is replaced by the box path of that name.
C = ["--checkpoint={teacher}"]
CASES = [
    # collect.py
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--episodes=0"], "--episodes=0: must be a positive"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--episodes=-1"], "--episodes=-1"),
    ("collect", C + ["--tasks=bogus", "--output={new}"], "unknown task 'bogus'"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--resume", "--random_actions=0,0.5"],
     "--resume: a resumable collection plays the planner's own actions"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--resume", "--group=0"], "--group=0"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--random_actions=nan"], "not a probability"),
    ("collect", C + ["--tasks=,", "--output={new}"], "no task given"),
    ("collect", C + ["--tasks=cup-catch,cup-catch", "--output={new}"], "listed twice"),
    ("collect", C + ["--tasks=cup-catch", "--output={new}"], "not in the checkpoint's task set"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--seed=-1"], "--seed=-1"),
    ("collect", ["--checkpoint=/nonexistent.pt", "--tasks=cartpole-balance", "--output={new}"], "no such file"),
    ("collect", C + ["--tasks=cartpole-balance", "--output=."], "holds the current directory"),
    ("collect", C + ["--tasks=cartpole-balance", "--output=sub"], "not a tdmpc_jax dataset; pass --overwrite"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={file}"], "is a file"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={file}/x"], "cannot be created"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--episodes=two"], "must be an integer"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "--epsiodes=2"], "--epsiodes: unknown flag"),
    ("collect", C + ["--tasks=cartpole-balance", "--output={new}", "episodes=2"], "unexpected argument"),
    ("collect", C + ["--tasks=cartpole-balance"], "--output: is required"),
    # convert.py
    ("convert", ["--input={teacher}", "--output={new}", "--task_set=bogus"], "--task_set=bogus: unknown task set"),
    ("convert", ["--input={teacher}", "--output=."], "holds the current directory"),
    ("convert", ["--input={teacher}", "--output=.", "--overwrite"], "holds the current directory"),
    ("convert", ["--input={teacher}", "--output=sub"], "not a tdmpc_jax checkpoint; pass --overwrite"),
    ("convert", ["--input={teacher}", "--output=sub/thesis.tex"], "is a file"),
    ("convert", ["--input={teacher}", "--output=sub/thesis.tex", "--export_format=new"], "exists; pass --overwrite"),
    ("convert", ["--input={teacher}", "--output=sub", "--export_format=new"], "is a directory"),
    ("convert", ["--input={teacher}", "--output={file}/x.pt", "--export_format=new"], "cannot be created"),
    ("convert", ["--input={teacher}", "--output=x.pt"], "pass --export_format"),
    ("convert", ["--input={teacher}"], "nothing to do"),
    ("convert", ["--input={teacher}", "--output={new}", "--export_format=newest"], "--export_format=newest"),
    ("convert", ["--input=/nonexistent.pt", "--output={new}"], "no such file"),
    # distill.py
    ("distill", ["--data={ds}", "--output={new}", "--steps=0"], "--steps=0: must be a positive integer"),
    ("distill", ["--data={ds}", "--output={new}", "--steps=-5"], "--steps=-5"),
    ("distill", ["--data={ds}", "--output={new}", "--checkpoint_every=0"], "--checkpoint_every=0"),
    ("distill", ["--data={ds}", "--output={new}", "--steps=10", "--average_last=0.5", "--average_snapshots=20"],
     "20 snapshots do not fit in the last 5 of 10 updates"),
    ("distill", ["--data={ds}", "--output={new}", "--log_every=0"], "--log_every=0"),
    ("distill", ["--data={ds}", "--output={new}", "--batch_size=0"], "--batch_size=0"),
    ("distill", ["--data={ds}", "--output={new}", "--student_size=-16,16,8"], "must be positive"),
    ("distill", ["--data={ds}", "--output={new}", "--student_size=2"], "not an official size"),
    ("distill", ["--data={ds}", "--output={new}", "--student_size=16,16,12"], "multiple of 8"),
    ("distill", ["--data={ds}", "--output={new}", "--student_size=a,b,c"], "must be integers"),
    ("distill", ["--data={ds}", "--output={new}", "--teacher={teacher}", "--coef=nan"], "--coef=nan: must be a finite"),
    ("distill", ["--data={ds}", "--output={new}", "--teacher={teacher}", "--coef=-1"], "--coef=-1.0: must be >= 0"),
    ("distill", ["--data={ds}", "--output={new}", "--teacher={teacher}", "--q_coef=inf"], "--q_coef=inf"),
    ("distill", ["--data={ds}", "--output={new}", "--teacher={teacher}", "--coef=0"], "the teacher would be ignored"),
    ("distill", ["--data={ds}", "--output={new}", "--kl_coef=0.5"], "--kl_coef=0.5: needs --teacher"),
    ("distill", ["--data={ds}", "--output={new}", "--eval_every=5", "--eval_tasks=bogus"], "unknown task 'bogus'"),
    ("distill", ["--data={ds}", "--output={new}", "--eval_every=5", "--eval_tasks=cup-catch"],
     "not among the student's tasks"),
    ("distill", ["--data={ds}", "--output={new}", "--eval_tasks=cartpole-balance"], "without --eval_every"),
    ("distill", ["--data={ds}", "--output={new}", "--eval_every=-1"], "--eval_every=-1: must be >= 0"),
    ("distill", ["--data={ds}", "--output={new}", "--eval_episodes=0"], "--eval_episodes=0"),
    ("distill", ["--data={ds}", "--output={new}", "--task_set=mt31"], "unknown task set"),
    ("distill", ["--data={ds}", "--output={new}", "--coordinator=nohost"], "must be host:port"),
    ("distill", ["--data={ds}", "--output={new}", "--num_processes=0"], "--num_processes=0"),
    ("distill", ["--data={ds}", "--output={new}", "--process_id=3"], "must be < --num_processes=1"),
    ("distill", ["--data={ds}", "--output={new}", "--teacher=/nonexistent"], "--teacher=/nonexistent: no such file"),
    ("distill", ["--data={proj}", "--output={new}"], "not a dataset"),
    ("distill", ["--data={ds}", "--output=."], "not a distill.py run directory; pass --overwrite"),
    ("distill", ["--data={ds}", "--output={ds}"], "is a tdmpc_jax dataset, not a distill.py run"),
    ("distill", ["--data={ds}", "--output={file}"], "is a file"),
    ("distill", ["--data={nan_obs}", "--output={new}"], "obs at step 5 holds NaN"),
    ("distill", ["--data={big_obs}", "--output={new}"], "obs at step 7"),
    ("distill", ["--data={inf_obs}", "--output={new}"], "obs at step 7"),
    ("distill", ["--data={nan_action}", "--output={new}"], "action at step 5"),
    ("distill", ["--data={inf_reward}", "--output={new}"], "NaN/Inf reward at step 5"),
    ("distill", ["--data={task_change}", "--output={new}"], "task id changes inside an episode at step 5"),
    ("distill", ["--data={v99}", "--output={new}"], "unsupported dataset version 99"),
    ("distill", ["--data={no_obs_dim}", "--output={new}"], "missing 'obs_dim'"),
    ("distill", ["--data={str_steps}", "--output={new}"], "'num_steps' must be an integer"),
    ("distill", ["--data={str_tasks}", "--output={new}"], "'tasks' must be a non-empty list"),
    ("distill", ["--data={bool_dim}", "--output={new}"], "'action_dim' must be an integer"),
    ("distill", ["--data={bad_set}", "--output={new}"], "unknown 'task_set'"),
    # evaluate.py
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--workers=-2"], "--workers=-2: must be in [-1, 1024]"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--episodes=0"], "--episodes=0"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--num_samples=0"], "--num_samples=0"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--num_elites=600"], "must be <= --num_samples"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--num_pi_trajs=512"], "must be < --num_samples"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--horizon=0"], "--horizon=0"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--iterations=0"], "--iterations=0"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--devices=5"], "5 devices requested, this "
     "process has"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--parts=-1"], "--parts=-1: must be in [0, 64]"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--resume", "--group=0"], "--group=0"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output={new}", "--compute=int8"], "--compute=int8: value should be"),
    ("evaluate", C + ["--tasks=bogus", "--output={new}"], "unknown task 'bogus'"),
    ("evaluate", C + ["--tasks=mw-reach", "--output={new}"], "Meta-World"),
    ("evaluate", C + ["--tasks=cup-catch", "--output={new}"], "not in the checkpoint's task set"),
    ("evaluate", C + ["--tasks=cartpole-balance", "--output=."], "pass --overwrite"),
    ("evaluate", ["--output={new}"], "--checkpoint: is required (or use --compare)"),
    ("evaluate", ["--compare={proj}", "--output={new}"], "no results.json"),
    ("evaluate", C + ["--compare={proj}", "--output={new}"], "no results.json"),
    # import_dataset.py
    ("import_dataset", ["--chunks=/nonexistent/chunk_*.pt", "--output={new}"], "no file matches"),
    ("import_dataset", ["--chunks={file}", "--output=."], "holds the current directory"),
    ("import_dataset", ["--chunks={file}", "--output=sub"], "pass --overwrite"),
    ("import_dataset", ["--chunks={file}", "--output={new}", "--task_set=mt31"], "--task_set=mt31"),
    # pipeline.py
    ("pipeline", ["--output={new}", "--steps=0"], "--steps=0: must be a positive integer"),
    ("pipeline", ["--output={new}", "--num_samples=0"], "--num_samples=0"),
    ("pipeline", ["--output={new}", "--episodes=0"], "--episodes=0"),
    ("pipeline", ["--output={new}", "--collect_episodes=0"], "--collect_episodes=0"),
    ("pipeline", ["--output={new}", "--iterations=0"], "--iterations=0"),
    ("pipeline", ["--output={new}", "--batch_size=-1"], "--batch_size=-1"),
    ("pipeline", ["--output={new}", "--coef=0", "--policy_coef=0", "--plan_coef=0", "--plan_rank_coef=0"],
     "every distillation coefficient is 0"),
    ("pipeline", ["--output={new}", "--model_coef=-2"], "--model_coef=-2.0: must be >= 0"),
    ("pipeline", ["--output={new}", "--plan_rank_coef=-1"], "--plan_rank_coef=-1.0: must be >= 0"),
    ("pipeline", ["--output={new}", "--td_coef=-0.1"], "--td_coef=-0.1: must be >= 0"),
    ("pipeline", ["--output={new}", "--jobs=0"], "--jobs=0"),
    ("pipeline", ["--output={new}", "--collect_random_actions=0,1.5"], "1.5 is not a probability in [0, 1]"),
    ("pipeline", ["--output={new}", "--collect_random_actions=0,x"], "'x' is not a number"),
    ("pipeline", ["--output={new}", "--coef=nan"], "must be a finite"),
    ("pipeline", ["--output={new}", "--average_last=1"], "--average_last=1.0: must be < 1"),
    ("pipeline", ["--output={new}", "--average_last=-0.5"], "--average_last=-0.5: must be >= 0"),
    ("pipeline", ["--output={new}", "--average_snapshots=0"], "--average_snapshots=0: must be a positive integer"),
    ("pipeline", ["--output={new}", "--steps=4", "--average_snapshots=5"],
     "5 snapshots do not fit in the last 1 of 4 updates"),
    ("pipeline", ["--output={new}", "--student_size=1,2"], "three dims"),
    ("pipeline", ["--output={new}", "--tasks=bogus"], "unknown task 'bogus'"),
    ("pipeline", ["--output={new}", "--tasks=cup-catch"], "not in the checkpoint's task set"),
    ("pipeline", ["--output={new}", "--data={proj}"], "not a dataset"),
    ("pipeline", ["--output={new}", "--teacher=/nonexistent"], "no such file"),
    ("pipeline", ["--output=."], "not a pipeline.py output directory; pass --overwrite"),
    ("pipeline", ["--output={pipe}"], "data: is a non-empty directory, not a tdmpc_jax dataset"),
    # plan_fidelity.py
    ("plan_fidelity", ["--student={teacher}", "--data={ds}", "--output={new}"], "must end in .json"),
    ("plan_fidelity", ["--student=/nonexistent", "--data={ds}", "--output={new}.json"], "no such file"),
    ("plan_fidelity", ["--student={teacher}", "--data={proj}", "--output={new}.json"], "not a dataset"),
    ("plan_fidelity", ["--student={teacher}", "--data={ds}", "--output={new}.json", "--candidates=1"],
     "--candidates=1: must be in [2"),
    ("plan_fidelity", ["--student={teacher}", "--data={ds}", "--output={new}.json", "--tasks=bogus"], "unknown task"),
    # quantize.py
    ("quantize", C + ["--output={new}", "--mixed_share=nan"], "--mixed_share=nan: must be a finite"),
    ("quantize", C + ["--output={new}", "--mixed_share=-1"], "must be >= 0"),
    ("quantize", C + ["--output={new}", "--mixed_share=1.5"], "must be <= 1"),
    ("quantize", C + ["--output={new}", "--calib_steps=0"], "--calib_steps=0"),
    ("quantize", C + ["--output={new}", "--episodes=0"], "--episodes=0"),
    ("quantize", C + ["--output={new}", "--formats=int4"], "unknown formats ['int4']"),
    ("quantize", C + ["--output={new}", "--formats=int8,int8"], "listed twice"),
    ("quantize", C + ["--output={new}", "--tasks=bogus"], "unknown task"),
    ("quantize", C + ["--output={new}", "--extra=/nonexistent.pt"], "no such file"),
    ("quantize", C + ["--output=."], "pass --overwrite"),
    ("quantize", C + ["--output={quant}"], "fp16: is a non-empty directory, not a tdmpc_jax checkpoint"),
    # render.py
    ("render", ["--task=cup-spin", "--output={new}.avi"], "must end in .gif or .mp4"),
    ("render", ["--task=cup-spin", "--output=old.gif"], "exists; pass --overwrite"),
    ("render", ["--task=cup-spin", "--output=sub.gif", "--steps=0"], "--steps=0"),
    ("render", ["--task=cup-spin", "--output=sub.gif", "--size=0"], "--size=0"),
    ("render", ["--task=cup-spin", "--output=sub.gif", "--fps=0"], "--fps=0"),
    ("render", ["--task=bogus", "--output=sub.gif"], "unknown task 'bogus'"),
    ("render", ["--task=cup-spin,cup-catch", "--output=sub.gif"], "give one task"),
    ("render", ["--task=cup-spin", "--output=sub.gif", "--checkpoint=/nonexistent"], "no such file"),
    # train_online.py
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--utd=-1"], "--utd=-1.0: must be > 0"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--utd=0"], "must be > 0"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--utd=nan"], "--utd=nan: must be a finite"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--episodes=0"], "--episodes=0"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--episodes=-1"], "--episodes=-1"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--seed_steps=-1"], "--seed_steps=-1: must be >= 0"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--eval_every=-1"], "--eval_every=-1"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--eval_episodes=0"], "--eval_episodes=0"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--batch_size=0"], "--batch_size=0"),
    ("train_online", ["--tasks=cartpole-balance", "--output={new}", "--size=7"], "not an official size"),
    ("train_online", ["--tasks=,", "--output={new}"], "--tasks=,: no task given"),
    ("train_online", ["--tasks=mt30", "--output={new}"], "unknown task 'mt30'"),
    ("train_online", ["--tasks=mw-reach", "--output={new}"], "not in mt30"),
    ("train_online", ["--tasks=cartpole-balance", "--output=."], "not a train_online.py run directory; pass --overwrite"),
    ("train_online", ["--tasks=cartpole-balance", "--output={ds}"], "is a tdmpc_jax dataset"),
]


@pytest.mark.parametrize("script,args,needle", CASES, ids=[f"{c[0]}:{' '.join(c[1][-1:])}" for c in CASES])
def test_bad_input_is_one_line_up_front(box, script, args, needle):
    subst = dict(box, teacher=TEACHER)
    argv = [a.format(**subst) for a in args]
    watched = [box["proj"], box["ds"], box["pipe"], box["quant"]]
    before = _snapshot(*watched)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{script}.py"), *argv], cwd=box["proj"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    took = time.perf_counter() - t0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == "", r.stdout[-2000:]
    assert took < FAST_S, f"refused only after {took:.0f}s"
    assert _snapshot(*watched) == before, "the run touched the user's files or its inputs"
    assert not os.path.exists(box["new"]), "a refused run left its output behind"
    assert not [n for n in os.listdir(os.path.dirname(box["new"])) if n.startswith(".tmp-")]


def test_every_flag_of_every_entry_point_has_a_rule():
    """Bool and enum flags are checked by absl; every other flag must be declared with a tdmpc_jax.cli rule."""
    for script in SCRIPTS:
        code = ("import runpy, sys; from tdmpc_jax import cli; "
                f"runpy.run_path({os.path.join(REPO, 'experiments', script + '.py')!r}, run_name='entry'); "
                "print(','.join(cli.undeclared('entry')))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == "", f"{script}.py: flags without a validation rule: {r.stdout.strip()}"


def test_a_bad_flag_is_refused_before_jax_is_imported():
    """Defining and checking the flags imports no JAX (`tdmpc_jax/__init__` names its exports lazily; the flag
    registries `distill_terms` and `quantize.FORMATS` reach JAX through `lazy_import.lazy`): a typo costs the
    user a fraction of a second, not JAX's import."""
    for script in SCRIPTS:
        code = ("import runpy, sys\n"
                f"sys.argv = [{script!r}, '--no_such_flag=1']\n"
                "try:\n"
                f"    runpy.run_path({os.path.join(REPO, 'experiments', script + '.py')!r}, run_name='__main__')\n"
                "except SystemExit as e:\n"
                "    print(e.code, sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
        assert r.stdout.strip() == "1 []", (script, r.stdout[-500:], r.stderr[-1000:])
        assert r.stderr.strip().startswith("error: ") and "no_such_flag" in r.stderr, (script, r.stderr[-1000:])


def test_lazy_module_imports_on_first_use():
    from tdmpc_jax import lazy_import
    code = ("import sys; from tdmpc_jax.lazy_import import lazy; m = lazy('colorsys'); "
            "before = 'colorsys' in sys.modules; print(before, m.rgb_to_hsv(1, 0, 0)[0], 'colorsys' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.stdout.split() == ["False", "0.0", "True"], r.stderr[-1000:]
    m = lazy_import.lazy("os.path")
    assert m.join("a", "b") == os.path.join("a", "b") and repr(m) == "lazy('os.path')"
    with pytest.raises(AttributeError, match="read-only"):
        m.join = None
    with pytest.raises(AttributeError):
        m.no_such_name


def test_output_rule(tmp_path, monkeypatch):
    ds = write_dataset(tmp_path / "ds")
    own = str(tmp_path / "ck")
    tdmpc_jax.load_checkpoint(TEACHER).save(own)
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "thesis.tex").write_text("x")
    # accepted: new (missing parents too), empty, our own artefact of the same kind
    assert check_output(tmp_path / "a" / "b" / "c", "checkpoint") == str(tmp_path / "a" / "b" / "c")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "dataset")
    check_output(ds, "dataset")
    check_output(own, "checkpoint")
    # refused: foreign, a file, another kind of ours; --overwrite lifts it except where it can never work
    for path, kind, words in ((foreign, "checkpoint", "non-empty directory"), (ds, "checkpoint", "tdmpc_jax dataset"),
                              (own, "dataset", "tdmpc_jax checkpoint"), (foreign / "sub" / "thesis.tex", "dataset",
                                                                         "is a file")):
        with pytest.raises(OutputError, match=words):
            check_output(path, kind)
        check_output(path, kind, overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        check_output(foreign / "sub" / "thesis.tex", "distill-run", overwrite=True)
    with pytest.raises(OutputError, match="is a directory"):
        check_output(foreign, "torch-file", overwrite=True)
    monkeypatch.chdir(foreign / "sub")
    with pytest.raises(OutputError, match="current directory"):
        check_output(foreign, "checkpoint", overwrite=True)
    # run directories: claimed (marker) once, then recognised; a different kind is not
    run = claim_output(tmp_path / "run", "distill-run")
    assert json.load(open(os.path.join(run, MARKER)))["kind"] == "distill-run"
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    check_output(run, "distill-run")
    with pytest.raises(OutputError, match="distill.py run directory, not a train_online.py"):
        check_output(run, "train-run")


def test_dataset_writer_replaces_only_datasets(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="pass --overwrite"):
        write_dataset(foreign)
    assert os.listdir(foreign) == ["keep.txt"]
    ds = write_dataset(tmp_path / "ds", episodes=2)
    assert Dataset(write_dataset(ds, episodes=3)).num_episodes == 3  # our own dataset: replaced whole
    # something foreign appears while the episodes are written: nothing replaced, no temp left behind
    w = DatasetWriter(tmp_path / "late", 9, 2, TEACHER_TASKS)
    w.add_episode(np.zeros((3, 9)), np.zeros((3, 2)), np.zeros(3), 0)
    (tmp_path / "late").write_text("a file")
    with pytest.raises(OutputError, match="is a file"):
        w.close()
    assert (tmp_path / "late").read_text() == "a file"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_dataset_checks_at_open(box, tmp_path):
    assert Dataset(box["ds"]).num_episodes == 4
    for name, words in (("nan_obs", "obs at step 5"), ("big_obs", "obs at step 7"), ("nan_action", "action at step 5"),
                        ("task_change", "task id changes inside an episode"), ("v99", "unsupported dataset version"),
                        ("no_obs_dim", "missing 'obs_dim'"), ("str_steps", "'num_steps'"), ("bad_set", "task_set")):
        with pytest.raises(DatasetError, match=words):
            Dataset(box[name])
    with pytest.raises(ValueError, match="beyond"):
        with DatasetWriter(tmp_path / "w", 9, 2, TEACHER_TASKS) as w:
            w.add_episode(np.full((3, 9), 3e38), np.zeros((3, 2)), np.zeros(3), 0)
    assert os.listdir(tmp_path) == []


def test_student_config_for_a_custom_task_list_teacher():
    from tdmpc_jax.config import config_from_spec, student_config
    t = tdmpc_jax.load_checkpoint(TEACHER).config
    s = student_config("32,48,16", t)
    assert (s.tasks, s.obs_dims, s.action_dims, s.task_dim) == (t.tasks, t.obs_dims, t.action_dims, t.task_dim)
    assert (s.enc_dim, s.mlp_dim, s.latent_dim, s.model_size) == (32, 48, 16, None)
    assert student_config("1", t).latent_dim == 128
    assert student_config("1", None, "mt30") == config_from_spec("1", "mt30")
    with pytest.raises(ValueError, match="cannot tell"):
        student_config("1")


def test_distill_with_the_shipped_teacher(box, tmp_path):
    """checkpoints/teacher-mt4 (a custom task list) distils directly with experiments/distill.py."""
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(REPO, "experiments", "distill.py"), f"--teacher={TEACHER}",
            f"--data={box['ds']}", f"--output={out}", "--student_size=32,48,16", "--batch_size=8", "--steps=3",
            "--log_every=1", "--checkpoint_every=3"]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    agent = tdmpc_jax.load_checkpoint(out / "agent")
    assert agent.config.tasks == tuple(TEACHER_TASKS) and agent.config.latent_dim == 16
    assert json.load(open(out / MARKER))["kind"] == "distill-run"


def test_convert_replaces_its_own_output_and_respects_overwrite(tmp_path):
    script = os.path.join(REPO, "experiments", "convert.py")
    run = lambda *a: subprocess.run([sys.executable, script, f"--input={TEACHER}", *a], capture_output=True,
                                    text=True, env=ENV, timeout=300, cwd=tmp_path)
    for _ in range(2):  # the second run replaces the checkpoint the first one wrote
        r = run("--output=ck")
        assert r.returncode == 0, r.stderr
    (tmp_path / "mine.pt").write_text("not to be lost")
    r = run("--output=mine.pt", "--export_format=new")
    assert r.returncode == 1 and (tmp_path / "mine.pt").read_text() == "not to be lost"
    r = run("--output=mine.pt", "--export_format=new", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert zipfile.is_zipfile(tmp_path / "mine.pt")
    r = run("--output=new/dir/x.pt", "--export_format=new")  # missing parents are created; no temp names
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "new" / "dir")) == ["x.pt"]
