"""Shared glue for the absl entry points in experiments/: flag validation, one-line errors, non-zero exits.

Every entry point declares a rule for each of its flags right after defining them, e.g.

    cli.positive_int("steps", "batch_size")
    cli.finite_float("coef", lo=0)
    cli.task_list("tasks")
    cli.output("output", "distill-run")        # also defines --overwrite

The rules are absl flag validators, so they run while the command line is parsed: before `main`, before
jax compiles anything, before any file is written. `run(main)` turns every bad flag (a rule, an absl type
error, an unknown or missing flag) and every user error raised later into ONE line on stderr,
`error: <what>: <problem>`, and exit status 1.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import sys

from absl import app, flags, logging

from tdmpc_jax import compile_cache
from tdmpc_jax.checkpoints.errors import CheckpointError

FLAGS = flags.FLAGS
USER_ERRORS = (CheckpointError, ValueError, OSError, RuntimeError, FloatingPointError)  # OSError: e.g. a full disk
SEED_MAX = 2 ** 31 - 1
_SENTINEL = "\x1f"  # marks our own messages inside absl's IllegalFlagValueError text
_DECLARED: set = set()


def _show(name, value) -> str:
    if value is None:
        return f"--{name}"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"--{name}={value}"


def rule(names, check):
    """Declare a validator for flag(s) `names` (str or tuple). check(value) (or check(dict of values) for a
    tuple) raises ValueError(problem) on bad input; the error line reads `--name=value: problem`."""
    multi = not isinstance(names, str)
    names = tuple(names) if multi else names
    if not multi:  # a cross-flag check does not count as a flag's own rule (see `undeclared`)
        _DECLARED.add(names)

    def checker(value):
        try:
            check(value)
        except (ValueError, OSError, TypeError) as e:
            what = _show(names, value) if not multi else None
            msg = str(e) if multi else f"{what}: {e}"
            raise flags.ValidationError(_SENTINEL + msg) from None
        return True

    if multi:
        flags.register_multi_flags_validator(list(names), checker)
    else:
        flags.register_validator(names, checker)


def _each(names, check):
    for n in names:
        rule(n, check)


def positive_int(*names):
    """Integers >= 1 (None, an optional flag left unset, passes)."""
    def check(v):
        if v is not None and v < 1:
            raise ValueError("must be a positive integer")
    _each(names, check)


def non_negative_int(*names):
    def check(v):
        if v is not None and v < 0:
            raise ValueError("must be >= 0")
    _each(names, check)


def int_range_check(v, lo=None, hi=None):
    """ValueError unless v (None passes) is in [lo, hi]: for a rule whose bounds are known only when it runs."""
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        raise ValueError(f"must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")


def int_range(*names, lo=None, hi=None):
    _each(names, lambda v: int_range_check(v, lo, hi))


def seed(*names):
    int_range(*names, lo=0, hi=SEED_MAX)


def finite_float(*names, lo=None, hi=None, lo_open=False, hi_open=False):
    """Finite floats in [lo, hi] (open ends with lo_open / hi_open): NaN and +-inf are always refused."""
    def check(v):
        if v is None:
            return
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise ValueError(f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise ValueError(f"must be {'<' if hi_open else '<='} {hi}")
    _each(names, check)


def probability_list(*names):
    """A DEFINE_list of probabilities: every item a number in [0, 1] (an empty list passes)."""
    def check(v):
        for item in v or ():
            try:
                p = float(item)
            except ValueError:
                raise ValueError(f"{item!r} is not a number") from None
            if not 0.0 <= p <= 1.0:  # NaN fails too
                raise ValueError(f"{item} is not a probability in [0, 1]")
    _each(names, check)


def free_string(*names):
    """A string flag with no constraint (declared so that every flag has a rule)."""
    _each(names, lambda v: None)


def _suggest(name, known):
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_tasks(task_set):
    """The tasks of `task_set` if it is a registered set, else every registered task (tdmpc_jax.task_registry)."""
    from tdmpc_jax.task_registry import TASK_SETS, task_names
    return TASK_SETS[task_set].tasks if task_set in TASK_SETS else task_names()


def check_tasks(value, *, sets=True, task_set=None, single=False):
    """Task names (comma-separated, or a set name 'mt30'/'mt80' when `sets`) -> list, ValueError if bad."""
    from tdmpc_jax.config import TASK_SETS
    s = (",".join(value) if isinstance(value, (list, tuple)) else str(value)).strip()
    if sets and not single and s in TASK_SETS:
        tasks = list(TASK_SETS[s].tasks)
    else:
        tasks = [t.strip() for t in s.split(",")]
        if not any(tasks):
            raise ValueError("no task given")
        if "" in tasks:
            raise ValueError("empty task name in the list")
        if single and len(tasks) > 1:
            raise ValueError("give one task")
        known = _known_tasks(task_set)
        for t in tasks:
            if t not in known:
                hint = _suggest(t, list(known) + (list(TASK_SETS) if sets else []))
                raise ValueError(f"unknown task {t!r}{hint}" + ("" if task_set is None else f" (not in {task_set})"))
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} listed twice")
    mw = [t for t in tasks if t.startswith("mw-")]
    if mw:
        raise ValueError(f"task {mw[0]!r}: Meta-World environments are not supported yet")
    return tasks


def task_list(*names, sets=True, task_set=None, single=False):
    """Comma-separated known task names (or 'mt30'/'mt80' when `sets`): non-empty, no duplicates, no unknown."""
    _each(names, lambda v: v is None or check_tasks(v, sets=sets, task_set=task_set, single=single))


def task_set_name(*names):
    def check(v):
        from tdmpc_jax.config import TASK_SETS
        if v is not None and v not in TASK_SETS:
            raise ValueError(f"unknown task set{_suggest(v, list(TASK_SETS))} (known: {', '.join(TASK_SETS)})")
    _each(names, check)


def size_spec(*names):
    """An official model size (1/5/19/48/317) or 'enc,mlp,latent' positive dims (latent a multiple of 8)."""
    def check(v):
        from tdmpc_jax.config import parse_size_spec
        if v is not None:
            parse_size_spec(v)
    _each(names, check)


def choices(*names, known, noun="value"):
    """Every element of a list flag in `known` (callable -> sequence, evaluated at parse time); non-empty."""
    def check(v):
        if v is None:
            return
        k = known() if callable(known) else known
        if not v:
            raise ValueError("empty list")
        bad = [x for x in v if x not in k]
        if bad:
            raise ValueError(f"unknown {noun}s {bad}{_suggest(bad[0], list(k))} (known: {', '.join(k)})")
        dup = sorted({x for x in v if list(v).count(x) > 1})
        if dup:
            raise ValueError(f"{dup[0]!r} listed twice")
    _each(names, check)


def _path_problem(p, kind=None):
    if not p:
        return "empty path"
    if not os.path.exists(p):
        return "no such file or directory"
    if kind == "dir" and not os.path.isdir(p):
        return "not a directory"
    if kind == "file" and not os.path.isfile(p):
        return "not a file"
    if not os.access(p, os.R_OK):
        return "not readable"
    return None


def existing_path(*names, kind=None):
    """Paths (a string flag or every element of a list flag) that exist; kind 'file' / 'dir' narrows it."""
    def check(v):
        if v is None:
            return
        many = isinstance(v, (list, tuple))
        for p in (v if many else [v]):
            problem = _path_problem(p, kind)
            if problem:
                raise ValueError(f"{p}: {problem}" if many else problem)
    _each(names, check)


def dataset_dir(*names):
    """An existing tdmpc_jax dataset directory (meta.json there; Dataset() checks the rest before any work)."""
    def check(v):
        if v is None:
            return
        problem = _path_problem(v, "dir")
        if problem:
            raise ValueError(f"not a dataset ({problem})")
        if not os.path.isfile(os.path.join(v, "meta.json")):
            raise ValueError("not a dataset (no meta.json)")
    _each(names, check)


def _caller_module() -> str:
    """The module that called the flag-defining helper (the script's path for __main__): absl lists its
    flags under that name in --help, and `undeclared` looks them up there."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return sys.argv[0] if caller == "__main__" else caller


def output(name: str, kind, overwrite: str = "overwrite", extensions=None, depends=()):
    """The output rule (tdmpc_jax.results_io.check_output) at parse time; defines --overwrite if needed.

    `kind`: an output kind, or a callable(dict of the values of name, overwrite and `depends`) -> kind;
    `extensions`: allowed file suffixes."""
    from tdmpc_jax.results_io import check_output
    if overwrite not in FLAGS:
        flags.DEFINE_bool(overwrite, False, "replace / write into an existing output even when it is not "
                                            "recognisably this program's own artefact of the same kind",
                          module_name=_caller_module())  # listed in --help
    _DECLARED.update((name, overwrite))

    def check(values):
        path = values[name]
        if path is None:
            return
        if extensions and os.path.splitext(path)[1].lower() not in extensions:
            raise ValueError(f"{_show(name, path)}: must end in {' or '.join(extensions)}")
        k = kind(values) if callable(kind) else kind
        try:
            check_output(path, k, bool(values[overwrite]))
        except ValueError as e:
            raise ValueError(f"{_show(name, path)}: {getattr(e, 'problem', e)}") from None
    rule((name, overwrite, *depends), check)


def distill_flags(**defaults):
    """Define one float flag per distillation term registered so far (tdmpc_jax.distill_terms: the built-ins,
    and a user's terms registered before this call; default 0 unless given in `defaults` by flag name), each
    finite and >= 0. -> the flag names."""
    from tdmpc_jax.config import DISTILL_TERMS
    module = _caller_module()
    names = []
    for field, (name, what) in DISTILL_TERMS.items():
        flags.DEFINE_float(name, defaults.pop(name, 0.0), f"distillation: {what}",
                           module_name=module)
        names.append(name)
    if defaults:
        raise ValueError(f"unknown distillation flags {sorted(defaults)}")
    finite_float(*names, lo=0)
    return tuple(names)


def averaging_flags(last: float = 0.0, snapshots: int = 5, steps: str = "steps"):
    """--average_last and --average_snapshots (weight averaging, `offline.average_window`), checked
    against the --`steps` flag. -> their names."""
    module = _caller_module()
    flags.DEFINE_float("average_last", last, "weight averaging (SWA): each trained student is the mean of "
                       "--average_snapshots snapshots of its weights spread evenly over this last fraction of the "
                       "updates, the final one included (0: the final weights)", module_name=module)
    flags.DEFINE_integer("average_snapshots", snapshots, "weight snapshots averaged (see --average_last)",
                         module_name=module)
    finite_float("average_last", lo=0, hi=1, hi_open=True)
    positive_int("average_snapshots")

    def fits(v):
        from tdmpc_jax.offline import average_window
        try:
            average_window(v[steps], v["average_last"], v["average_snapshots"])
        except ValueError as e:
            raise ValueError(f"--average_snapshots={v['average_snapshots']}: {e}") from None
    check((steps, "average_last", "average_snapshots"), fits)
    return "average_last", "average_snapshots"


def block_flag(default: int = 1):
    """--block: updates per jitted call of the offline loop (`offline.RunConfig.block`). -> its name."""
    flags.DEFINE_integer("block", default, "training updates per jitted call (a lax.scan; blocks stop at every log, "
                         "checkpoint and weight snapshot, so runs, logs and resumes are those of --block=1 and the "
                         "arithmetic equals single updates): fewer host round trips, for accelerators",
                         module_name=_caller_module())
    positive_int("block")
    return "block"


def averaging(steps: int) -> dict:
    """RunConfig keyword arguments of the averaging flags for a run of `steps` updates."""
    from tdmpc_jax.offline import average_window
    return average_window(steps, FLAGS.average_last, FLAGS.average_snapshots)


def distill_coefficients(teacher_given: bool = True) -> dict:
    """TrainConfig keyword arguments from the distillation flags (all 0 without a teacher): the built-in
    terms' fields, and `distill_extra` for registered terms with a flag > 0 (`TrainConfig.distill_kwargs`)."""
    from tdmpc_jax.config import DISTILL_TERMS, TrainConfig
    return TrainConfig.distill_kwargs({field: (FLAGS[name].value if teacher_given else 0.0)
                                       for field, (name, _) in DISTILL_TERMS.items() if name in FLAGS})


def check(names, fn):
    """Cross-flag rule: fn(dict of values) raises ValueError('--flag=value: problem') (a full line)."""
    rule(tuple(names), fn)


def undeclared(module=None):
    """Flags of `module` (default: the main program's) that are neither bool/enum nor declared with a rule."""
    module = module or sys.argv[0]
    out = []
    for f in FLAGS.get_flags_for_module(module):
        if f.name in _DECLARED or isinstance(f, flags.BooleanFlag) or \
                isinstance(f.parser, (flags.EnumParser, flags.EnumClassParser)):
            continue
        out.append(f.name)
    return sorted(set(out))


def fail(line: str):
    print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


_REQUIRED = re.compile(r"Flag --(\S+) must have a value other than None")
_FLAG_PREFIX = re.compile(r"^flags? (--\S+?=.*?): (.*)$")


def _flag_error_line(e: Exception) -> str:
    msg = str(e).strip()
    line = msg.splitlines()[0] if msg else type(e).__name__  # absl lists every bad flag: report the first
    if _SENTINEL in line:
        return line.split(_SENTINEL, 1)[1]
    line = re.sub(r"invalid literal for int\(\) with base \d+: .*", "must be an integer", line)
    line = re.sub(r"could not convert string to float: .*", "must be a number", line)
    m = _REQUIRED.search(line)
    if m:
        return f"--{m.group(1)}: is required"
    if isinstance(e, flags.UnrecognizedFlagError):
        hint = f" (did you mean --{e.suggestions[0]}?)" if getattr(e, "suggestions", None) else ""
        return f"--{e.flagname}: unknown flag{hint}"
    m = _FLAG_PREFIX.match(line)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    return line


def parse_flags(argv):
    """absl flag parsing where every problem is one `error:` line and exit status 1 (app.run's flags_parser)."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error_line(e))
    if len(rest) > 1:
        fail(f"{rest[1]}: unexpected argument (flags are --name=value)")
    return rest


def run(main):
    """absl `app.run(main)`, but bad flags and user errors print `error: <one line>` and exit with status 1."""
    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)  # orbax/jax INFO chatter would bury the progress lines
        compile_cache.enable()  # persistent XLA cache (~/.cache/tdmpc_jax/xla; TDMPC_JAX_NO_CACHE=1: off)
        try:
            return main(argv)
        except USER_ERRORS as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            fail(lines[0] if lines else type(e).__name__)
    app.run(wrapped, flags_parser=parse_flags)
