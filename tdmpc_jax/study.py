"""The MT30 distillation study as resumable units: one run = one directory with a done marker.

Layout of a study directory (`experiments/study.py --output=DIR`):
  DIR/data/                 the teacher's dataset (collected once; DIR/data/DONE)
  DIR/data-mppi/            stage 4's: the teacher's MPPI episodes (`DATA`)
  DIR/teacher/eval_pi/      the teacher's policy-prior evaluation, made where the report's directory has none
                            (`teacher_pi_evaluation`; the MPPI line is the reference file)
  DIR/runs/<size>-<arm>[-<data>]-s<seed>/
      unit.json             size, dims, arm, coefficients, seed, steps, batch, git commit
      train/                `offline.train_offline` (train_state, metrics, curve.png, agent/)
      eval_pi/results.json  policy prior, PI_EPISODES per task, eval_mode=True
      eval_mppi/results.json  MPPI with the official planner settings, MPPI_EPISODES per task
      DONE                  written last: {scores, wall times}
A unit skips every part that already exists (training resumes from its last checkpoint), so a killed
study restarts where it stopped and finished units are never redone. `report` rebuilds every table and
figure from the finished units only: those here and those known by the per-run JSON an earlier report
committed (`committed_units`: a fresh clone continues the study without the earlier units' directories).
A unit started but not finished when a sitting ends travels the same way: the report copies a trained
unit's student, training log and finished evaluation groups, or a unit still training's last training
checkpoint and log, to <results>/inflight/<unit>/ (`carry_unfinished`), and the next sitting, in a fresh
clone, goes on from there (`restore_carried`): it evaluates on, or trains on from that checkpoint (the same
updates, batches and keys as an uninterrupted run: `offline` resumes exactly).
`diagnose` measures what limits the students (`tdmpc_jax.diagnosis`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tdmpc_jax import atomic, runs

# Students (enc_dim, mlp_dim, latent_dim; task_dim 96 and the rest as in the official 1M model), by
# learnable parameters on MT30 (the teacher, the official 1M architecture, has 1,426,427).
SIZES: Dict[str, str] = {
    "0.1M": "48,64,32",      # 97,931 learnable
    "0.23M": "64,128,32",    # 228,475 (6.2x fewer than the teacher)
    "0.35M": "96,160,64",    # 346,811 (4.1x fewer)
    "0.67M": "128,256,64",   # 670,843
    "1.4M": "1",             # the teacher's own architecture: self-distillation control
}
MAIN_SIZE = "0.23M"


def dims_label(size: str) -> str:
    """'enc,mlp,latent' of a study size for tables; an official size also says which it is."""
    from tdmpc_jax.config import MODEL_SIZES, parse_size_spec
    parsed = parse_size_spec(SIZES[size])
    if isinstance(parsed, tuple):
        return ",".join(map(str, parsed))
    layout = MODEL_SIZES[parsed]
    return f"{layout.enc_dim},{layout.mlp_dim},{layout.latent_dim} (official size {parsed})"

# Arms: TrainConfig distillation coefficients (all other settings official).
ARMS: Dict[str, Dict[str, float]] = {
    "scratch": {},
    "reward": {"distill_coef": 0.4},                                   # TD-MPC-Opt
    # the best combination measured on `make distill` (docs/distillation.md: "Earlier recipes")
    "best": {"distill_coef": 0.4, "distill_model_coef": 1.0},
    "reward+policy": {"distill_coef": 0.4, "distill_policy_coef": 1.0},
    "reward+q": {"distill_coef": 0.4, "distill_q_coef": 0.1},
    "reward+kl": {"distill_coef": 0.4, "distill_reward_kl_coef": 0.4},
    # the policy target also shapes the encoder (distill_terms.policy_representation): policy prior 10.9 against
    # reward+policy's 9.2, MPPI 5.2 against 4.7 (docs/distillation.md)
    "reward+policy+repr": {"distill_coef": 0.4, "distill_policy_coef": 1.0, "distill_policy_repr_coef": 1.0},
    "all": {"distill_coef": 0.4, "distill_policy_coef": 1.0, "distill_q_coef": 0.1, "distill_reward_kl_coef": 0.4,
            "distill_model_coef": 1.0},
    # stage 3: `make distill`'s planner-objective recipe (docs/distillation.md); Q from the teacher, no TD
    "plan": {"distill_coef": 0.4, "distill_policy_coef": 1.0, "distill_plan_coef": 1.0, "distill_plan_rank_coef": 10.0,
             "value_coef": 0.0},
    # stage 4 (teacher-MPPI data): plan, with the policy also pulled toward the dataset's MPPI actions
    "plan+action": {"distill_coef": 0.4, "distill_policy_coef": 1.0, "distill_plan_coef": 1.0,
                    "distill_plan_rank_coef": 10.0, "distill_action_coef": 1.0, "value_coef": 0.0},
}
MAIN_ARMS = ("scratch", "reward", "best")
# the other sizes: scratch, the paper's reward term, and the best combination measured at the main size
# (stage 3's "plan": MPPI 8.7 vs best's 5.6 and scratch's 6.8 at 0.23M)
SIZE_ARMS = ("scratch", "reward", "plan")
ABLATION_ARMS = ("reward", "reward+policy", "reward+q", "reward+kl", "reward+policy+repr", "best", "all")
STUDENT_ARMS = MAIN_ARMS + ("plan",)  # the main size's students committed as checkpoints by the report
MPPI_DATA_ARMS = ("scratch", "reward", "plan", "plan+action")
DAGGER_ARMS = ("scratch", "reward+policy", "plan")
DAGGER_DATA = ("dagger", "more")
DAGGER2_ARMS = ("reward+policy",)

# The study's datasets, each collected once by the teacher, `collect_episodes` per task, seed 1. "pi" is
# the data of stages 1-3; "mppi" (stage 4) holds the teacher's planning: docs/distillation.md "Why not 60%".
DATA: Dict[str, dict] = {
    "pi": {"dir": "data", "mpc": False, "acting": "teacher policy prior, sampled (eval_mode=False)"},
    "mppi": {"dir": "data-mppi", "mpc": True, "acting": "teacher MPPI, official planner settings (eval_mode=False)"},
    # stage 5, one DAgger round: the "pi" data plus the states a distilled student reaches with its own sampled
    # policy prior (a committed student of the main comparison, `episodes` per task, collection seed `seed`); the
    # distillation terms label every state of a batch with the teacher's heads (docs/distillation.md "Why not
    # 60%"). "more" is its control: as many more episodes, from the teacher's own sampled policy prior
    "dagger": {"dir": "data-dagger", "mpc": False, "with": "pi", "actor": "0.23M-best-s1", "episodes": 10, "seed": 2,
               "control": "more"},
    "more": {"dir": "data-more", "mpc": False, "with": "pi", "actor": "teacher", "episodes": 10, "seed": 2},
    # stage 6, the second DAgger round: round 1's data plus the states that round 1's best student (by MPPI)
    # reaches with its own sampled policy prior; the report compares each arm on it with the same arm on round 1
    "dagger2": {"dir": "data-dagger2", "mpc": False, "with": "dagger", "actor": "0.23M-reward+policy-dagger-s1",
                "episodes": 10, "seed": 3},
}


def _palette() -> dict:
    """arm (and `<arm>@<data>`) -> color, the same in every figure of the study: the arms run at every size
    first (blue, orange, green), then the rest in ARMS order."""
    from tdmpc_jax import plots
    return plots.arm_palette(SIZE_ARMS + tuple(a for a in ARMS if a not in SIZE_ARMS), [d for d in DATA if d != "pi"])


def train_config(arm: str, batch_size: int):
    """An arm's TrainConfig: its distillation coefficients (any registered term) and, where given, the
    student's own TD value-loss weight (`value_coef`)."""
    from tdmpc_jax.config import TrainConfig
    coefs = dict(ARMS[arm])
    td = {"value_coef": coefs.pop("value_coef")} if "value_coef" in coefs else {}
    return TrainConfig(batch_size=batch_size, **TrainConfig.distill_kwargs(coefs), **td)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    steps: int = 10_000
    batch_size: int = 256
    collect_episodes: int = 20   # per task, teacher's stochastic policy prior
    pi_episodes: int = 10
    mppi_episodes: int = 3
    eval_mode: bool = False      # MPPI with exploration noise: the paper's protocol (28.45)
    tasks: Tuple[str, ...] = ()  # () = every task of the teacher (MT30); a subset for smoke tests
    # PlannerConfig fields that differ from the official MPPI settings, as (name, value) pairs, for the MPPI
    # evaluation and the teacher's MPPI data; () = the official settings (every study run). Smoke tests plan
    # with fewer samples: what they check is the machinery, not the scores.
    planner: Tuple[Tuple[str, Any], ...] = ()

    def mppi(self, **fields):
        """The PlannerConfig of the study's MPPI (official unless `planner` says otherwise), with `fields`."""
        from tdmpc_jax.planner import PlannerConfig
        return PlannerConfig(**{**dict(self.planner), **fields})


@dataclasses.dataclass(frozen=True)
class Unit:
    size: str
    arm: str
    seed: int
    data: str = "pi"  # a DATA key

    @property
    def name(self) -> str:
        return f"{self.size}-{self.arm}-s{self.seed}" if self.data == "pi" else \
            f"{self.size}-{self.arm}-{self.data}-s{self.seed}"

    @property
    def group(self) -> str:
        """The arm as the report groups it: the arm, tagged with its data where that is not the "pi" data."""
        return self.arm if self.data == "pi" else f"{self.arm}@{self.data}"


def parse_unit_name(name: str) -> Unit:
    """'<size>-<arm>[-<data>]-s<seed>' -> Unit (ValueError naming what is wrong)."""
    size, _, rest = str(name).partition("-")
    body, _, seed = rest.rpartition("-s")
    arm, _, data = body.partition("-")
    if size not in SIZES or arm not in ARMS or (data or "pi") not in DATA or not seed.isdigit():
        raise ValueError(f"{name!r} is not a unit name <size>-<arm>[-<data>]-s<seed> (sizes {', '.join(SIZES)}; "
                         f"arms {', '.join(ARMS)}; data {', '.join(d for d in DATA if d != 'pi')})")
    return Unit(size, arm, int(seed), data or "pi")


STAGES = 6


def stage_units(stage: int) -> List[Unit]:
    """Stage 1: the main size, scratch vs reward vs best, 3 seeds (seed-major: a first answer early).
    Stage 2: the other sizes and the 1.4M control (SIZE_ARMS, 2 seeds), the ablation at the main size
    (3 seeds).
    Stage 3: `make distill`'s planner-objective recipe ("plan") at the main size, 3 seeds.
    Stage 4: the main size on the teacher's MPPI data (DATA["mppi"]), MPPI_DATA_ARMS, 2 seeds.
    Stage 5: the main size on one DAgger round (DATA["dagger"]) and on its control (DATA["more"]: as much more
    data from the teacher), DAGGER_ARMS, 2 seeds.
    Stage 6: the main size on a second DAgger round (DATA["dagger2"]), DAGGER2_ARMS, 2 seeds."""
    if stage == 1:
        return [Unit(MAIN_SIZE, a, s) for s in (1, 2, 3) for a in MAIN_ARMS]
    if stage == 2:
        units = [Unit(z, a, s) for s in (1, 2) for z in SIZES if z != MAIN_SIZE for a in SIZE_ARMS]
        units += [Unit(MAIN_SIZE, a, s) for s in (1, 2, 3) for a in ABLATION_ARMS if a not in MAIN_ARMS]
        return units
    if stage == 3:
        return [Unit(MAIN_SIZE, "plan", s) for s in (1, 2, 3)]
    if stage == 4:
        return [Unit(MAIN_SIZE, a, s, "mppi") for s in (1, 2) for a in MPPI_DATA_ARMS]
    if stage == 5:
        return [Unit(MAIN_SIZE, a, s, d) for s in (1, 2) for a in DAGGER_ARMS for d in DAGGER_DATA]
    if stage == 6:
        return [Unit(MAIN_SIZE, a, s, "dagger2") for s in (1, 2) for a in DAGGER2_ARMS]
    raise ValueError(f"stage must be 1-{STAGES}, got {stage}")


def git_commit(repo: str) -> str:
    """HEAD of `repo`; $TDMPC_JAX_GIT_COMMIT where the tree travels without its .git (a GPU machine)."""
    if os.environ.get("TDMPC_JAX_GIT_COMMIT"):
        return os.environ["TDMPC_JAX_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _done(path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


CPU_GROUP = 16  # MPPI episodes per resumable group on a CPU (evaluation: ~1/6 of a unit's; collection: 1/38)


def ensure_data(out: str, teacher, scfg: StudyConfig, seed: int = 1, data: str = "pi", students: str = ""):
    """A study dataset (DATA[data]) with a done marker: collect_episodes per task, acting with the teacher's
    sampled policy prior ("pi") or its MPPI planner at the official settings ("mppi"); or ("dagger", "more",
    "dagger2") the dataset DATA[data]["with"] (itself made first where it is not there) plus the episodes that
    DATA[data]["actor"] (the teacher, or a committed student: `students`/<name>, the report's students
    directory) plays with its sampled policy prior, collection seed DATA[data]["seed"]."""
    from tdmpc_jax.data import Dataset, merge_datasets
    from tdmpc_jax.data.collect import collect
    from tdmpc_jax.planner import PlannerConfig
    import jax
    spec = DATA[data]
    path = os.path.join(out, spec["dir"])
    if _done(os.path.join(path, "DONE")) is not None:
        return Dataset(path)
    t0 = time.perf_counter()
    if "with" in spec:
        import tdmpc_jax
        actor = teacher
        if spec["actor"] != "teacher":
            src = os.path.join(students, spec["actor"])
            if not os.path.isdir(src):
                raise ValueError(f"{src}: the student that acts for the {data!r} data is not there (the report of "
                                 f"stage 1 commits it)")
            actor = tdmpc_jax.load_checkpoint(src)
        base = ensure_data(out, teacher, scfg, seed, spec["with"], students)
        own = collect(actor, study_tasks(teacher, scfg), spec["episodes"], path + ".added",
                      PlannerConfig(mpc=False), spec["seed"], eval_mode=False, progress=True, overwrite=True)
        ds = merge_datasets(path, [base, own], overwrite=True)
        returns = own.meta_returns
        who = "the teacher" if spec["actor"] == "teacher" else f"the student {spec['actor']}"
        acting = (f"the {spec['with']} data + {spec['episodes']} episodes per task of {who}'s sampled policy prior "
                  f"(eval_mode=False, seed {spec['seed']})")
    else:
        # teacher MPPI on a CPU (~11 h for 600 episodes): in resumable groups, kept in <dir>.partial
        resume = path + ".partial" if spec["mpc"] and jax.default_backend() == "cpu" else None
        ds = collect(teacher, study_tasks(teacher, scfg), scfg.collect_episodes, path, scfg.mppi(mpc=spec["mpc"]),
                     seed, eval_mode=False, progress=True, overwrite=True, resume_dir=resume, group=CPU_GROUP)
        returns, acting = ds.meta_returns, spec["acting"]
    atomic.write_file(os.path.join(path, "DONE"), json.dumps(
        {"episodes_per_task": spec.get("episodes", scfg.collect_episodes), "acting": acting,
         "returns": returns, "wall_s": time.perf_counter() - t0}, indent=1))
    return Dataset(path)


def study_tasks(teacher, scfg: StudyConfig) -> List[str]:
    return list(scfg.tasks or teacher.config.tasks)




def _evaluate_into(directory, agent, tasks, episodes, pcfg, eval_mode, seed=1, num_workers=0):
    """num_workers: env worker processes (-1: the backend's default, `evaluation.env_workers`). On a CPU an
    MPPI evaluation is resumable in groups of CPU_GROUP episodes (`evaluation.evaluate(resume_dir=...)`,
    the same returns): the 1.4M control's takes longer than a sitting there. An accelerator plays the whole
    batch at once (minutes; groups would cost it its batching)."""
    import jax
    from tdmpc_jax.evaluation import evaluate
    from tdmpc_jax.results_io import read_results, write_results
    if os.path.exists(os.path.join(directory, "results.json")):
        return read_results(directory)
    os.makedirs(directory, exist_ok=True)
    from tdmpc_jax.evaluation import default_parts, env_workers
    workers = env_workers(num_workers)
    resumable = pcfg.mpc and jax.default_backend() == "cpu"
    res = evaluate(agent, tasks, episodes, seed, pcfg, eval_mode=eval_mode, num_workers=workers, progress=True,
                   parts=default_parts(workers), resume_dir=directory if resumable else None, group=CPU_GROUP)
    write_results(directory, res)
    return res


# Units carried between sittings, under the report's directory (`carry_unfinished`, `restore_carried`): a unit
# started but not finished when a sitting ends, on a machine whose study directory does not survive it
INFLIGHT = "inflight"
# what a trained unit keeps: the student, its training log, the finished policy-prior evaluation and the MPPI
# evaluation's finished groups; a unit still training keeps its last training checkpoint (the train state:
# parameters, target Qs and optimizer moments, ~4x the student's bytes) and its training log
CARRIED = ("unit.json", os.path.join("train", "metrics.jsonl"), os.path.join("train", "agent"), "eval_pi",
           os.path.join("eval_mppi", "partial"))
CARRIED_TRAINING = ("unit.json", os.path.join("train", "metrics.jsonl"), os.path.join("train", runs.TRAIN_STATE))


def _trained(d: str) -> bool:
    return os.path.exists(os.path.join(d, "train", "agent", "DONE"))


def _updates_done(d: str) -> int:
    """The updates of the training checkpoint in unit directory `d` (0 without one; CheckpointError when it is
    not a train state). Reads its JSON metadata only."""
    path = os.path.join(d, "train", runs.TRAIN_STATE)
    return runs.read_state_meta(path)["step"] if os.path.isdir(path) else 0


def _progress(d: str) -> Tuple[bool, int]:
    """How far unit directory `d` is: (trained?, updates of its training checkpoint; 0 when trained or when it
    has none); only reads. The tuples order as progress does: a trained unit is further on than any
    checkpoint, a later checkpoint than an earlier one."""
    return (True, 0) if _trained(d) else (False, _updates_done(d))


def check_carried(src: str, name: str) -> Tuple[bool, int]:
    """Check that `src` holds a carried unit named `name`, trained or with a training checkpoint (ValueError
    naming the file and the problem) -> its `_progress`."""
    path = os.path.join(src, "unit.json")
    rec = _done(path)
    try:
        if parse_unit_name(name) != Unit(**rec["unit"]):
            raise ValueError(f"its unit is {Unit(**rec['unit']).name!r}, not {name!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a carried study unit ({type(e).__name__}: {e})") from None
    if not _trained(src) and not os.path.isdir(os.path.join(src, "train", runs.TRAIN_STATE)):
        raise ValueError(f"{src}: a carried unit with neither its trained student (train/agent/DONE) nor a "
                         f"training checkpoint (train/{runs.TRAIN_STATE})")
    return _progress(src)


def carry_unfinished(out: str, dest: str, finished: Sequence[str] = ()) -> Dict[str, dict]:
    """Copy every unit of out/runs that is started but not finished into dest/INFLIGHT/<unit>/ (each replaced
    whole): a trained unit as CARRIED (the student, its training log, the finished evaluations and MPPI
    groups), a unit still training as CARRIED_TRAINING (its last training checkpoint and log); drop
    dest/INFLIGHT/<unit> of the units in `finished`. A later sitting in a fresh clone picks a carried unit up
    where this one left it (`restore_carried`). Run it when no unit is running.
    -> {unit: {"trained": True, "pi": evaluated?, "mppi_groups": kept} or {"trained": False, "updates": n}}."""
    root, carried = os.path.join(dest, INFLIGHT), {}
    runs_dir = os.path.join(out, "runs")
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        d = os.path.join(runs_dir, name)
        if name in finished or _done(os.path.join(d, "DONE")) is not None:
            continue
        if _trained(d):
            # a policy-prior evaluation cut short resumes nothing: only a finished one travels
            parts = [p for p in CARRIED if os.path.exists(os.path.join(d, p)) and
                     (p != "eval_pi" or os.path.exists(os.path.join(d, p, "results.json")))]
            partial = os.path.join(d, "eval_mppi", "partial")
            groups = [f for f in os.listdir(partial) if f.endswith(".json") and f != "spec.json"] \
                if os.path.isdir(partial) else []
            info = {"trained": True, "pi": "eval_pi" in parts, "mppi_groups": len(groups)}
        else:
            # the last checkpoint as it is on disk (a save cut short by a kill is finished or rolled back first)
            if not atomic.recover_dir(os.path.join(d, "train", runs.TRAIN_STATE)) or not os.path.exists(
                    os.path.join(d, "unit.json")):
                continue  # killed before its first checkpoint: nothing to carry
            parts = [p for p in CARRIED_TRAINING if os.path.exists(os.path.join(d, p))]
            info = {"trained": False, "updates": _updates_done(d)}
        prior = os.path.join(root, name)
        # never replace a carried unit with one no further on (a trained one is replaced: it holds its groups)
        if os.path.isdir(prior) and not info["trained"] and check_carried(prior, name) >= (False, info["updates"]):
            continue

        def build(tmp, d=d, parts=parts):
            for p in parts:
                src, to = os.path.join(d, p), os.path.join(tmp, p)
                os.makedirs(os.path.dirname(to), exist_ok=True)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, to)
        atomic.replace_dir(prior, build)
        carried[name] = info
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name in finished and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name))
    return carried


def restore_carried(out: str, unit: Unit, carried: Optional[str], log=print) -> bool:
    """Where `carried` (a report's INFLIGHT directory) holds `unit` further on than out/runs/<unit> (trained
    where that is not, or a later training checkpoint), make out/runs/<unit> the carried unit (replaced whole);
    -> whether it did. The carried files are only read and copied."""
    src = os.path.join(carried, unit.name) if carried else ""
    d = os.path.join(out, "runs", unit.name)
    if not src or not os.path.isdir(src) or _trained(d):
        return False
    trained, updates = check_carried(src, unit.name)
    atomic.recover_dir(os.path.join(d, "train", runs.TRAIN_STATE))  # a local save cut short by a kill
    if _progress(d) >= (trained, updates):
        return False
    atomic.replace_dir(d, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
    log(f"[{unit.name}] carried from an earlier sitting ({src}): " +
        ("trained, evaluation resumes" if trained else f"training resumes at update {updates}"))
    return True


def run_unit(out: str, unit: Unit, teacher, dataset, scfg: StudyConfig, repo: str, log=print,
             eval_workers: int = 0, block: int = 1, carried: Optional[str] = None) -> dict:
    """Train and evaluate one unit, skipping what is already there; -> its DONE record. `eval_workers`
    environment processes step the evaluation episodes (same returns as in-process stepping); `block`
    updates per jitted call (`offline.RunConfig.block`: the same run, fewer host round trips); `carried`: a
    report's INFLIGHT directory, where an earlier sitting left the unit trained (`restore_carried`)."""
    from tdmpc_jax.config import student_config
    from tdmpc_jax.offline import RunConfig, train_offline
    from tdmpc_jax.planner import PlannerConfig
    import tdmpc_jax
    d = os.path.join(out, "runs", unit.name)
    done = _done(os.path.join(d, "DONE"))
    if done is not None:
        return done
    restore_carried(out, unit, carried, log)
    os.makedirs(d, exist_ok=True)
    cfg = student_config(SIZES[unit.size], teacher.config)
    coefs = ARMS[unit.arm]
    tcfg = train_config(unit.arm, scfg.batch_size)
    info = {"unit": dataclasses.asdict(unit), "dims": SIZES[unit.size], "coefficients": coefs,
            "steps": scfg.steps, "batch_size": scfg.batch_size, "git_commit": git_commit(repo),
            "study": dataclasses.asdict(scfg)}
    if not os.path.exists(os.path.join(d, "unit.json")):
        atomic.write_file(os.path.join(d, "unit.json"), json.dumps(info, indent=1))
    else:  # the commit the unit started at (an earlier sitting's, where it was carried)
        info["git_commit"] = (_done(os.path.join(d, "unit.json")) or {}).get("git_commit", info["git_commit"])
    agent_dir = os.path.join(d, "train", "agent")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(agent_dir, "DONE")):
        log(f"[{unit.name}] training {scfg.steps} updates ...")
        run = RunConfig(steps=scfg.steps, seed=unit.seed, log_every=max(1, scfg.steps // 100),
                        checkpoint_every=max(1, scfg.steps // 10), block=block)
        train_offline(cfg, tcfg, dataset, os.path.join(d, "train"), run, teacher if tcfg.uses_teacher else None)
        atomic.write_file(os.path.join(agent_dir, "DONE"), "")
    agent = tdmpc_jax.load_checkpoint(agent_dir)
    log(f"[{unit.name}] policy prior, {scfg.pi_episodes} episodes per task ...")
    tasks = study_tasks(teacher, scfg)
    pi = _evaluate_into(os.path.join(d, "eval_pi"), agent, tasks, scfg.pi_episodes, PlannerConfig(mpc=False), True,
                        num_workers=eval_workers)
    log(f"[{unit.name}] MPPI ({'official settings' if not scfg.planner else dict(scfg.planner)}), "
        f"{scfg.mppi_episodes} episodes per task ...")
    mppi = _evaluate_into(os.path.join(d, "eval_mppi"), agent, tasks, scfg.mppi_episodes, scfg.mppi(),
                          scfg.eval_mode, num_workers=eval_workers)
    rows = _log_rows(os.path.join(d, "train", "metrics.jsonl"))
    per_update = rows[-1]["elapsed_s"] / rows[-1]["step"] if rows and rows[-1].get("elapsed_s") else None
    record = {**info, "learnable_params": agent.num_params()["learnable"],
              "mppi_normalized_score": mppi["normalized_score"], "pi_normalized_score": pi["normalized_score"],
              "train_s_per_update": per_update, "uses_teacher": tcfg.uses_teacher, "device": _device(),
              "wall_s_this_sitting": time.perf_counter() - t0}
    atomic.write_file(os.path.join(d, "DONE"), json.dumps(record, indent=1))
    return _done(os.path.join(d, "DONE"))


def run_parallel(commands: Sequence[Tuple[str, List[str]]], jobs: int, log_dir: str, log=print,
                 poll_s: float = 1.0) -> Dict[str, int]:
    """Run (name, argv) commands as subprocesses, at most `jobs` at a time, in the given order; each one's
    output goes to log_dir/<name>.log. Logs a line as each ends (with an ETA at the rate commands
    have finished so far); -> {name: exit code}. Interrupted (Ctrl-C, SIGTERM), it terminates the
    commands it started. Study units are independent directories with their own locks, so units run
    side by side (a GPU machine's host cores and device are shared; evaluations are host-bound there)."""
    import signal
    import subprocess
    import threading
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    os.makedirs(log_dir, exist_ok=True)
    queue, running, codes, t0 = list(commands), {}, {}, time.perf_counter()

    def stop(signum, frame):  # SIGTERM (e.g. `timeout`): end the commands too, not only this process
        raise SystemExit(128 + signum)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        while queue or running:
            while queue and len(running) < jobs:
                name, argv = queue.pop(0)
                f = open(os.path.join(log_dir, f"{name}.log"), "ab")
                running[name] = (subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT), f)
                log(f"[{name}] started ({len(running)} running, {len(queue)} waiting; log {f.name})")
            for name, (proc, f) in list(running.items()):
                if proc.poll() is not None:
                    f.close()
                    del running[name]
                    codes[name] = proc.returncode
                    el = time.perf_counter() - t0
                    left = len(queue) + len(running)
                    eta = el / len(codes) * left  # at the rate commands have finished so far
                    log(f"[{name}] {'finished' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}: "
                        f"{len(codes)}/{len(codes) + left} after {el / 60:.1f} min, ETA {eta / 60:.0f} min")
            time.sleep(poll_s if running else 0)
    finally:
        for proc, f in running.values():
            proc.terminate()
            proc.wait()
            f.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return codes


def _device() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.platform}: {getattr(d, 'device_kind', '') or d.platform}"


def _log_rows(path):
    from tdmpc_jax.offline import read_log
    return [r for r in read_log(path) if "total_loss" in r]


# --- report ---------------------------------------------------------------------------------------

def finished_units(out: str, dest: Optional[str] = None) -> List[Tuple[Unit, dict, dict, dict]]:
    """(unit, DONE record, MPPI results, policy-prior results) of every finished unit: those under
    out/runs, then (with `dest`) those whose directory is not here but whose per-run JSON an earlier
    report committed to dest/runs (`committed_units`)."""
    from tdmpc_jax.results_io import read_results
    found = []
    runs_dir = os.path.join(out, "runs")
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        rec = _done(os.path.join(runs_dir, name, "DONE"))
        if rec is None:
            continue
        u = Unit(**rec["unit"])
        found.append((u, rec, read_results(os.path.join(runs_dir, name, "eval_mppi")),
                      read_results(os.path.join(runs_dir, name, "eval_pi"))))
    if dest is not None:
        found += committed_units(dest, {u.name for u, _, _, _ in found})
    return sorted(found, key=lambda f: f[0].name)


def committed_units(dest: str, skip=frozenset()) -> List[Tuple[Unit, dict, dict, dict]]:
    """Finished units known only by the per-run JSON a report committed (dest/runs/<unit>.json: the DONE
    record plus per-task MPPI and policy-prior means), except those named in `skip`. A study continued
    on another machine or in a fresh clone, where the earlier units' directories are not, reports
    them with the new ones. The files are only parsed (json), checked and never written here."""
    runs_dir = os.path.join(dest, "runs")
    found = []
    for fname in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        name, ext = os.path.splitext(fname)
        if ext != ".json" or name in skip:
            continue
        path = os.path.join(runs_dir, fname)
        try:
            with open(path) as f:
                rec = json.load(f)
            u = Unit(**rec["unit"])
            if u.name != name or u.size not in SIZES or u.arm not in ARMS or u.data not in DATA:
                raise ValueError(f"its unit is {u.name!r}, not a study unit named as the file")
            res = [{"normalized_score": float(rec[k + "_normalized_score"]),
                    "tasks": {t: {"mean": float(v)} for t, v in rec[k + "_tasks"].items()}} for k in ("mppi", "pi")]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a per-run record of the study ({type(e).__name__}: {e})") from None
        found.append((u, rec, res[0], res[1]))
    return found


def score_matrix(results: Sequence[dict], tasks: Sequence[str]) -> np.ndarray:
    """(runs, tasks) normalized scores (return / 10) for rliable."""
    return np.asarray([[r["tasks"][t]["mean"] / 10.0 for t in tasks] for r in results], np.float64)


def aggregate(scores: Dict[str, np.ndarray], reps: int = 2000, seed: int = 0) -> Dict[str, dict]:
    """rliable: mean and IQM with stratified-bootstrap 95% CIs over runs x tasks. Each group is resampled
    from the same seed: its CI depends on its own runs only, not on which other groups the report holds."""
    from rliable import library as rly
    from rliable import metrics
    fn = lambda x: np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])
    out = {}
    for k, v in scores.items():
        np.random.seed(seed)  # rliable draws from numpy's global generator
        point, ci = rly.get_interval_estimates({k: v}, fn, reps=reps)
        out[k] = {"mean": float(point[k][0]), "mean_ci95": [float(ci[k][0, 0]), float(ci[k][1, 0])],
                  "iqm": float(point[k][1]), "iqm_ci95": [float(ci[k][0, 1]), float(ci[k][1, 1])],
                  "runs": int(v.shape[0])}
    return out


def improvement_probability(x: np.ndarray, y: np.ndarray) -> float:
    """rliable's `metrics.probability_of_improvement` without its loop of scipy calls: per task the
    Mann-Whitney U of X over Y (pairs with x > y, ties counting one half) over n_x * n_y, averaged over
    tasks. Same value (tested against rliable); ~1000x faster, which is what the report's 2000 bootstrap
    replicates per comparison spend their time on."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x[:, None, :] - y[None, :, :]
    return float(np.mean((d > 0).mean(axis=(0, 1)) + 0.5 * (d == 0).mean(axis=(0, 1))))


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0) -> dict:
    """P(X > Y) over tasks (rliable), with a stratified-bootstrap 95% CI."""
    from rliable import library as rly
    np.random.seed(seed)
    point, ci = rly.get_interval_estimates({"p": (x, y)}, improvement_probability, reps=reps)
    lo, hi = np.ravel(ci["p"])
    return {"p": float(np.ravel(point["p"])[0]), "ci95": [float(lo), float(hi)]}


TEACHER_PI = "teacher_pi.json"  # in the report's directory: the teacher's policy-prior evaluation, committed once


def teacher_pi_evaluation(out: str, dest: str) -> Optional[dict]:
    """The teacher's policy-prior evaluation (results.json format) that the report draws its line from: the one
    committed in `dest` (TEACHER_PI), else this study directory's (`out`/teacher/eval_pi, which `report` then
    commits), else None. The committed one wins: the same evaluation on another machine differs by float
    rounding (16.88 on one CPU, 17.00 on another), and a report must not change with the machine that rebuilds it."""
    for path in (os.path.join(dest, TEACHER_PI), os.path.join(out, "teacher", "eval_pi", "results.json")):
        if os.path.exists(path):
            with open(path) as f:
                try:
                    rec = json.load(f)
                except ValueError:
                    rec = None
            if not isinstance(rec, dict) or isinstance(rec.get("normalized_score"), bool) or \
                    not isinstance(rec.get("normalized_score"), (int, float)):
                raise ValueError(f"{path}: not an evaluation's results.json (no numeric normalized_score)")
            return rec
    return None


def report(out: str, dest: str, teacher_mppi: dict, teacher_pi: Optional[dict], teacher_params: int) -> dict:
    """Rebuild summary.json, summary.md, per-run JSON and the figures in `dest` from finished units; commit
    `teacher_pi` (`teacher_pi_evaluation`) as dest/TEACHER_PI where none is there yet; carry the units that are
    started but not finished into dest/INFLIGHT (`carry_unfinished`) and drop the finished ones from there."""
    from tdmpc_jax import plots
    units = finished_units(out, dest)
    if not units:
        raise ValueError(f"{out}: no finished study unit yet")
    tasks = [t for t in teacher_mppi["tasks"] if all(t in u[2]["tasks"] for u in units)]
    os.makedirs(os.path.join(dest, "runs"), exist_ok=True)
    if teacher_pi is not None and not os.path.exists(os.path.join(dest, TEACHER_PI)):
        atomic.write_file(os.path.join(dest, TEACHER_PI), json.dumps(teacher_pi, indent=1))
    groups: Dict[Tuple[str, str], list] = {}
    for u, rec, mppi, pi in units:
        groups.setdefault((u.size, u.group), []).append((u, rec, mppi, pi))
        atomic.write_file(os.path.join(dest, "runs", u.name + ".json"), json.dumps(
            {**rec, "mppi_tasks": {t: mppi["tasks"][t]["mean"] for t in tasks},
             "pi_tasks": {t: pi["tasks"][t]["mean"] for t in tasks}}, indent=1))
    for u, _, _, _ in units:  # the students of the main comparison, as Orbax checkpoints
        if u.size == MAIN_SIZE and (u.arm in STUDENT_ARMS or u.data != "pi"):
            target = os.path.join(dest, "students", u.name)
            trained = os.path.join(out, "runs", u.name, "train", "agent")
            if not os.path.exists(os.path.join(target, "DONE")) and os.path.isdir(trained):
                atomic.replace_dir(target, lambda tmp, src=trained: shutil.copytree(src, tmp, dirs_exist_ok=True))
    for name, c in carry_unfinished(out, dest, finished=[u.name for u, *_ in units]).items():
        print(f"[{name}] " + (f"trained, not finished: carried to {os.path.join(dest, INFLIGHT, name)} (policy prior "
                              f"{'evaluated' if c['pi'] else 'to evaluate'}, {c['mppi_groups']} MPPI group(s) kept)"
                              if c["trained"] else f"training: carried to {os.path.join(dest, INFLIGHT, name)} at "
                              f"update {c['updates']} (its last checkpoint)"), flush=True)
    mppi_scores = {f"{z}/{a}": score_matrix([g[2] for g in v], tasks) for (z, a), v in groups.items()}
    pi_scores = {f"{z}/{a}": score_matrix([g[3] for g in v], tasks) for (z, a), v in groups.items()}
    agg_mppi, agg_pi = aggregate(mppi_scores), aggregate(pi_scores)
    summary = {"teacher": {"learnable_params": teacher_params, "mppi_normalized_score": teacher_mppi["normalized_score"],
                           "mppi_ci95": teacher_mppi.get("normalized_score_ci95"),
                           "pi_normalized_score": teacher_pi["normalized_score"] if teacher_pi else None},
               "groups": {}, "improvement": {}}
    for (z, a), v in sorted(groups.items(), key=lambda kv: (SIZES_ORDER(kv[0][0]), kv[0][1])):
        k = f"{z}/{a}"
        recs = [g[1] for g in v]
        summary["groups"][k] = {"size": z, "arm": a, "dims": dims_label(z), "learnable_params": recs[0]["learnable_params"],
                                "seeds": sorted(g[0].seed for g in v), "mppi": agg_mppi[k], "pi": agg_pi[k],
                                "train_s_per_update": _per_device([r for r in recs]),
                                "uses_teacher": recs[0]["uses_teacher"]}
    for z, a in groups:
        arm, _, data = a.partition("@")
        # against scratch on the same data; a group on other data also against its arm on the "pi" data, on the
        # data it adds to (DATA[...]["with"]) and, where that data has a control (DATA[...]["control"]), on that
        spec = DATA[data] if data else {}
        bases = ([f"scratch@{data}" if data else "scratch"] if arm != "scratch" else []) + ([arm] if data else [])
        bases += [f"{arm}@{spec[k]}" for k in ("with", "control") if spec.get(k, "pi") != "pi"]
        for b in bases:
            if f"{z}/{b}" in mppi_scores:
                x, y = f"{z}/{a}", f"{z}/{b}"
                summary["improvement"][f"{x} > {b}"] = {
                    "mppi": probability_of_improvement(mppi_scores[x], mppi_scores[y]),
                    "pi": probability_of_improvement(pi_scores[x], pi_scores[y]),
                    "runs": [int(mppi_scores[x].shape[0]), int(mppi_scores[y].shape[0])]}
    atomic.write_file(os.path.join(dest, "summary.json"), json.dumps(summary, indent=1))
    atomic.write_file(os.path.join(dest, "summary.md"), _markdown(summary))
    palette = _palette()
    plots.study_scaling(summary, os.path.join(dest, "score_vs_params.png"), palette)
    labels = [a if d == "pi" else f"{a}@{d}" for d in DATA for a in ARMS]  # the pi data's arms, then the others'
    main = {a: mppi_scores[f"{MAIN_SIZE}/{a}"] for a in labels if f"{MAIN_SIZE}/{a}" in mppi_scores}
    if main:
        # per task: the main comparison's arms and the arms on other data (every arm: arms_<size>.png)
        per_task = {a: v for a, v in main.items() if a in STUDENT_ARMS or "@" in a}
        plots.study_per_task(per_task, tasks, {t: teacher_mppi["tasks"][t]["mean"] / 10 for t in tasks},
                             os.path.join(dest, f"per_task_{MAIN_SIZE}.png"), f"MT30 per task, {MAIN_SIZE} students (MPPI)",
                             palette)
        plots.study_ablation(summary, [f"{MAIN_SIZE}/{a}" for a in main], os.path.join(dest, f"arms_{MAIN_SIZE}.png"),
                             f"MT30, every arm at {MAIN_SIZE} ({SIZES[MAIN_SIZE]}): mean normalized score, 95% "
                             "stratified-bootstrap CIs", palette)
    return summary


def diagnose(out: str, dest: str, teacher, teacher_mppi: dict, per_task: int = 512, own_episodes: int = 2) -> dict:
    """What limits the students (`tdmpc_jax.diagnosis`), written to dest/diagnosis.{json,md} and
    dest/coverage.png: data coverage over every finished unit (each arm over all sizes), and the reward /
    policy fit of the main size's committed students (dest/students) and of the teacher on the study's
    dataset and on the states each reaches with its own policy prior (`own_episodes` per task)."""
    import tdmpc_jax
    from tdmpc_jax import diagnosis, plots
    from tdmpc_jax.data import Dataset
    data_done = _done(os.path.join(out, "data", "DONE"))
    if data_done is None or not isinstance(data_done.get("returns"), dict):
        raise ValueError(f"{os.path.join(out, 'data')}: no finished study dataset (any stage collects it first)")
    units = finished_units(out, dest)
    if not units:
        raise ValueError(f"{out}: no finished study unit yet")
    tasks = [t for t in teacher_mppi["tasks"] if t in data_done["returns"] and all(t in u[2]["tasks"] for u in units)]
    by_arm: Dict[str, list] = {}
    for u, _, mppi, _ in units:
        if u.data == "pi":  # the units trained on this data
            by_arm.setdefault(u.arm, []).append(mppi)
    cov = diagnosis.coverage(data_done["returns"], teacher_mppi, {a: score_matrix(v, tasks) for a, v in by_arm.items()},
                             tasks)
    sdir = os.path.join(dest, "students")
    students = {n: tdmpc_jax.load_checkpoint(os.path.join(sdir, n))
                for n in (sorted(os.listdir(sdir)) if os.path.isdir(sdir) else [])}
    fits = diagnosis.fit(students, teacher, Dataset(os.path.join(out, "data")), per_task)
    own = diagnosis.own_states(students, teacher, tasks, own_episodes, per_task, progress=True)
    per_agent = diagnosis.summarize_fit(fits)
    res = {"coverage": cov,
           "fit": {"per_arm": _per_arm(per_agent), "per_agent": per_agent,
                   "per_task": fits, "transitions_per_task": per_task, "students": list(students)},
           "own_states": {"per_arm": _per_arm(diagnosis.summarize_own_states(own, fits)), "per_task": own,
                          "episodes_per_task": own_episodes, "transitions_per_task": per_task}}
    atomic.write_file(os.path.join(dest, "diagnosis.json"), json.dumps(res, indent=1))
    atomic.write_file(os.path.join(dest, "diagnosis.md"), _diagnosis_markdown(res))
    arms = [a for a in SIZE_ARMS if a in cov["arms"]]
    plots.study_coverage(cov, arms, os.path.join(dest, "coverage.png"),
                         "MT30 per task: the students against the data that trained them (every size)", _palette())
    return res


def holds(data: str, part: str) -> bool:
    """Whether DATA[data]'s dataset holds DATA[part]'s episodes (it is `part`, or built on it via "with")."""
    while data:
        if data == part:
            return True
        data = DATA[data].get("with", "")
    return False


def novelty_datasets(out: str):
    """(every finished dataset, every finished added set: DATA key -> Dataset) of the study directory; an
    error when there is no added set (what `data_novelty` measures), checked before anything is written."""
    from tdmpc_jax.data import Dataset
    full = {k: Dataset(os.path.join(out, v["dir"])) for k, v in DATA.items()
            if _done(os.path.join(out, v["dir"], "DONE")) is not None}
    added = {k: Dataset(os.path.join(out, DATA[k]["dir"] + ".added")) for k in full if "with" in DATA[k]}
    if not added:
        raise ValueError(f"{out}: no finished added dataset (stages 5 and 6 make them)")
    return full, added


def data_novelty(out: str, dest: str, per_task: int = 1024, seed: int = 0) -> dict:
    """How new each added dataset's states are (`diagnosis.novelty`), written to dest/novelty.{json,md,png}:
    every finished added set (DATA entries with "with": its <dir>.added episodes) against every finished
    dataset that does not already hold it. Scales: per task, over the collected-whole datasets and every
    added set. An added set of the teacher's own policy ("more") against a base gives that base's
    "nothing new" level."""
    from tdmpc_jax import diagnosis, plots
    full, added = novelty_datasets(out)
    sets = [d for k, d in full.items() if "with" not in DATA[k]] + list(added.values())
    have = [set(diagnosis.present_tasks(d)) for d in sets]
    tasks = [t for t in sets[0].tasks if all(t in h for h in have)]
    scales = diagnosis.task_scales(sets, tasks)
    pairs = {}
    for a, ads in added.items():
        for b, base in full.items():
            if not holds(b, a):
                per = diagnosis.novelty(base, ads, scales, per_task, seed)
                pairs[f"{a}|{b}"] = {"added": a, "actor": DATA[a]["actor"], "base": b,
                                     "base_transitions": int(base.num_steps),
                                     "median": float(np.median(list(per.values()))),
                                     "mean": float(np.mean(list(per.values()))), "tasks": per}
    res = {"per_task": per_task, "seed": seed, "tasks": tasks, "pairs": pairs,
           "measure": "per task, the median distance of added states to their nearest state of the same task in "
                      "the base data (observations standardized per task over every dataset); median over tasks"}
    os.makedirs(dest, exist_ok=True)
    atomic.write_file(os.path.join(dest, "novelty.json"), json.dumps(res, indent=1))
    atomic.write_file(os.path.join(dest, "novelty.md"), _novelty_markdown(res))
    shown = [k for k, v in pairs.items() if any(DATA[x].get("with") == v["base"] for x in added)]
    plots.study_novelty(res, shown, os.path.join(dest, "novelty.png"),
                        "MT30 per task: how far added states lie from the data they join")
    return res


def _novelty_markdown(res: dict) -> str:
    pairs = res["pairs"]
    lines = [f"Novelty of added data: {res['measure']} ({res['per_task']} added states per task).", "",
             "| added set (actor) | base (transitions) | median over tasks | mean | the teacher's fresh episodes against "
             "the same base |", "|---|---|---|---|---|"]
    for k, v in pairs.items():
        ref = next((r for r in pairs.values() if r["base"] == v["base"] and r["actor"] == "teacher"), None)
        rel = "" if ref is None or ref is v else f"{v['median'] / max(ref['median'], 1e-12):.1f}x ({ref['median']:.3f})"
        lines.append(f"| {v['added']} ({v['actor']}) | {v['base']} ({v['base_transitions']:,}) | {v['median']:.3f} | "
                     f"{v['mean']:.3f} | {rel} |")
    keys = list(pairs)
    lines += ["", "| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for t in res["tasks"]:
        lines.append(f"| {t} | " + " | ".join(f"{pairs[k]['tasks'][t]:.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"

def _per_arm(per_agent: Dict[str, dict]) -> Dict[str, dict]:
    """Per-agent summaries (student names as in runs/, and "teacher") as per-arm means over seeds, with
    the number of runs."""
    out: Dict[str, dict] = {"teacher": {**per_agent["teacher"], "runs": 1}}
    for n, v in per_agent.items():
        if n != "teacher":
            out.setdefault(parse_unit_name(n).group, []).append(v)
    return {a: (v if a == "teacher" else {"runs": len(v), **{k: float(np.mean([r[k] for r in v])) for k in v[0]}})
            for a, v in out.items()}


def _diagnosis_markdown(res: dict) -> str:
    cov, fit = res["coverage"], res["fit"]["per_arm"]
    lines = [f"The data's policy (teacher policy prior, sampled) scores {100 * cov['data_of_teacher']:.0f}% of the "
             "teacher's MPPI return summed over tasks.", "",
             "| arm (every size) | runs | MPPI return, % of the data policy | % of the teacher's MPPI | "
             "Spearman over tasks with the data | with the teacher |", "|---|---|---|---|---|---|"]
    for a, v in sorted(cov["arms"].items()):
        lines.append(f"| {a} | {v['runs']} | {100 * v['of_data']:.0f}% | {100 * v['of_teacher']:.0f}% | "
                     f"{v['spearman_data']:.2f} | {v['spearman_teacher']:.2f} |")
    lines += ["", f"Fit on the study's dataset ({res['fit']['transitions_per_task']} transitions per task, the same "
              f"for every agent; students: the main size's committed checkpoints, mean over seeds):", "",
              "| agent | runs | reward R^2 (median over tasks) | reward MAE (mean) | tasks with a lower reward MAE "
              "than the teacher's | policy-mean MSE vs the teacher | vs the data's actions |",
              "|---|---|---|---|---|---|---|"]
    for a, v in fit.items():
        below = "" if a == "teacher" else f"{v['tasks_reward_mae_below_teacher']:.1f} of {v['tasks']:.0f}"
        lines.append(f"| {a} | {v['runs']} | {v['reward_r2_median']:.2f} | {v['reward_mae']:.3f} | {below} | "
                     f"{v['pi_mse_teacher']:.3f} | {v['pi_mse_data']:.3f} |")
    sat = ", ".join(f"{a} {100 * v['pi_saturated']:.0f}%" for a, v in fit.items())
    lines += ["", f"Policy-mean MSE: where actions sit at +-1, 0 is the same action and 2 an unrelated one. Action "
              f"dims where the policy mean is beyond +-0.99: {sat}."]
    own = res["own_states"]
    lines += ["", f"Where each agent acts: {own['episodes_per_task']} policy-prior episodes per task (eval mode) of "
              f"every agent, {own['transitions_per_task']} of its transitions per task, its heads and the teacher's "
              "measured on them (mean over tasks and seeds):", "",
              "| agent | runs | policy-mean MSE vs the teacher, data's states | own states | reward MAE, data | "
              "own states | the teacher's reward MAE on these states | score of these episodes (few: noisy) |",
              "|---|---|---|---|---|---|---|---|"]
    for a, v in own["per_arm"].items():
        lines.append(f"| {a} | {v['runs']} | {v['pi_mse_teacher_data']:.3f} | {v['pi_mse_teacher_own']:.3f} | "
                     f"{v['reward_mae_data']:.3f} | {v['reward_mae_own']:.3f} | {v['teacher_reward_mae_own']:.3f} | "
                     f"{v['score_own']:.1f} |")
    return "\n".join(lines) + "\n"


def _per_device(recs) -> Dict[str, float]:
    """Mean seconds per update by device: runs trained on different machines are not averaged together
    (a record without "device" was trained on the CPU, before the field existed)."""
    by: Dict[str, list] = {}
    for r in recs:
        if r.get("train_s_per_update"):
            by.setdefault(r.get("device", "cpu"), []).append(r["train_s_per_update"])
    return {k: float(np.mean(v)) for k, v in sorted(by.items())}


def SIZES_ORDER(size: str) -> int:
    return list(SIZES).index(size)


def _markdown(s: dict) -> str:
    t = s["teacher"]
    lines = [f"Teacher (released TD-MPC-Opt 1M, {t['learnable_params']:,} learnable): MPPI {t['mppi_normalized_score']:.1f}"
             + (f", policy prior {t['pi_normalized_score']:.1f}" if t["pi_normalized_score"] is not None else ""), "",
             "| size | dims | learnable | arm | seeds | MPPI mean [95% CI] | MPPI IQM [95% CI] | % of teacher | "
             "policy prior mean [95% CI] | s/update (device) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, g in s["groups"].items():
        m, p = g["mppi"], g["pi"]
        # one seed: the stratified bootstrap over runs has nothing to resample, its interval is a point
        ci = (lambda x, lohi: f"{x:.1f} [{lohi[0]:.1f}, {lohi[1]:.1f}]") if len(g["seeds"]) > 1 else \
            (lambda x, lohi: f"{x:.1f} (one seed: no CI)")
        lines.append(f"| {g['size']} | {g['dims']} | {g['learnable_params']:,} | {g['arm']} | {len(g['seeds'])} | "
                     f"{ci(m['mean'], m['mean_ci95'])} | {ci(m['iqm'], m['iqm_ci95'])} | "
                     f"{100 * m['mean'] / t['mppi_normalized_score']:.0f}% | {ci(p['mean'], p['mean_ci95'])} | "
                     f"{'; '.join(f'{v:.4f} ({k})' for k, v in g['train_s_per_update'].items())} |")
    if s["improvement"]:
        lines += ["", "| comparison | P(improvement), MPPI [95% CI] | policy prior [95% CI] |", "|---|---|---|"]
        for k, v in sorted(s["improvement"].items()):
            # a side with one seed: the bootstrap over its runs has nothing to resample (a point, not a CI)
            one = min(v.get("runs", [2])) < 2
            p = (lambda x: f"{x['p']:.2f} (one seed: no CI)") if one else \
                (lambda x: f"{x['p']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]")
            lines.append(f"| {k} | {p(v['mppi'])} | {p(v['pi'])} |")
    return "\n".join(lines) + "\n"
