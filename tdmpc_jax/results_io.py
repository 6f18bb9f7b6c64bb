"""Write evaluation results atomically as JSON + CSV; read them back for comparisons.

Also the one output rule of every entry point (`check_output`, `claim_output`): an output is validated
before any work; only an artefact recognisably ours and of the same kind is replaced or written into;
anything else (a non-empty foreign directory, a file) is refused unless `overwrite` is given.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile

MARKER = ".tdmpc_jax-output.json"  # written into every run/report directory we create (`claim_output`)
GIF_COMMENT = b"tdmpc_jax render"     # embedded in the GIFs experiments/render.py writes


class OutputError(ValueError):
    """An output path we must not (or cannot) write: `path: problem`."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def _json(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _format(path):
    return (_json(path) or {}).get("format")


def _marker(d):
    return (_json(os.path.join(d, MARKER)) or {}).get("kind")


def _has(d, *names):
    return any(os.path.exists(os.path.join(d, n)) for n in names)


def _run_dir(kind, legacy):
    """Recognise a directory by our marker of `kind`, or (written before markers existed) by `legacy`."""
    def recognise(d):
        m = _marker(d)
        return m == kind if m is not None else legacy(d)
    return recognise


def _our_gif(path):
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.format == "GIF" and im.info.get("comment") == GIF_COMMENT
    except Exception:  # not an image at all
        return False


# kind -> (what it is, how we recognise one of ours, replaced as a whole (True) or written into (False))
OUTPUT_KINDS = {
    "checkpoint": ("a tdmpc_jax checkpoint", lambda d: _format(os.path.join(d, "metadata", "metadata")) == "tdmpc_jax",
                   True),
    "dataset": ("a tdmpc_jax dataset", lambda d: _format(os.path.join(d, "meta.json")) == "tdmpc_jax-dataset", True),
    "distill-run": ("a distill.py run directory",
                    _run_dir("distill-run", lambda d: _has(d, "train_state") and not _has(d, "counters.json")), False),
    "train-run": ("a train_online.py run directory", _run_dir("train-run", lambda d: _has(d, "counters.json")), False),
    "eval": ("an evaluate.py output directory", _run_dir("eval", lambda d: _has(d, "results.json")), False),
    "quantize": ("a quantize.py output directory", _run_dir("quantize", lambda d: _has(d, "report.json")), False),
    "study": ("a study.py directory", _run_dir("study", lambda d: _has(d, "runs") and _has(d, "data")), False),
    "study-results": ("a study.py --report directory", _run_dir("study-results", lambda d: _has(d, "summary.json")),
                      False),
    "onnx-export": ("an export.py ONNX directory",
                    lambda d: _format(os.path.join(d, "manifest.json")) == "tdmpc_jax-onnx", True),
    "pipeline": ("a pipeline.py output directory", _run_dir("pipeline", lambda d: _has(d, "settings.json") or (
        _format(os.path.join(d, "data", "meta.json")) == "tdmpc_jax-dataset")), False),
}
# file kinds: (what it is, how we recognise one of ours)
FILE_KINDS = {
    "torch-file": ("a PyTorch checkpoint file", lambda f: False),  # could be anyone's (e.g. a downloaded .pt)
    "video": ("a rendered video", _our_gif),
    "plan-fidelity": ("a plan_fidelity.py report", lambda f: _format(f) == "tdmpc_jax-plan-fidelity"),
}


def check_output(path, kind: str, overwrite: bool = False) -> str:
    """Validate an output before any work; -> its absolute path. Raises OutputError (nothing is touched).

    Accepted: a path that does not exist yet (its nearest existing ancestor a writable directory), an empty
    directory, or our own artefact of `kind` (OUTPUT_KINDS / FILE_KINDS). A file, a non-empty foreign
    directory or another kind of ours is refused unless `overwrite`; with it, the writer replaces it (whole-
    artefact kinds) or writes into it (run directories). Never accepted: a directory holding the current
    directory, a file where a run directory must be, a directory where a file must be."""
    if kind not in OUTPUT_KINDS and kind not in FILE_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if not str(path).strip():
        raise OutputError(repr(str(path)), "empty output path")
    p = os.path.abspath(os.fspath(path))
    is_file_kind = kind in FILE_KINDS
    what, ours, whole = (FILE_KINDS[kind] + (True,)) if is_file_kind else OUTPUT_KINDS[kind]
    if not os.path.lexists(p):
        anc = os.path.dirname(p)
        while not os.path.exists(anc):
            anc = os.path.dirname(anc)
        if not os.path.isdir(anc):
            raise OutputError(p, f"cannot be created: {anc} is a file")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(p, f"cannot be created: {anc} is not writable")
        return p
    action = "replace it" if whole else "write into it anyway"
    if os.path.isdir(p):
        if is_file_kind:
            raise OutputError(p, f"is a directory (expected a file path for {what})")
        cwd = os.path.abspath(os.getcwd())
        if whole and (cwd == p or cwd.startswith(p.rstrip(os.sep) + os.sep)):
            raise OutputError(p, "holds the current directory; refusing to replace it")
        if not os.access(p, os.W_OK | os.X_OK) or not os.access(os.path.dirname(p), os.W_OK | os.X_OK):
            raise OutputError(p, "is not writable")
        if not os.listdir(p) or ours(p) or overwrite:
            return p
        other = [d for k, (d, rec, _) in OUTPUT_KINDS.items() if k != kind and rec(p)]
        found = other[0] if other else "a non-empty directory"
        raise OutputError(p, f"is {found}, not {what}; pass --overwrite to {action}")
    if not is_file_kind:
        if whole and overwrite:
            return p
        raise OutputError(p, f"is a file, not {what}" + ("; pass --overwrite to replace it" if whole else ""))
    if not os.access(os.path.dirname(p), os.W_OK | os.X_OK):
        raise OutputError(p, f"cannot be replaced: {os.path.dirname(p)} is not writable")
    if ours(p) or overwrite:
        return p
    raise OutputError(p, "exists; pass --overwrite to replace it")


def claim_output(path, kind: str, overwrite: bool = False) -> str:
    """`check_output`, then create the directory and mark it ours (run/report kinds); -> absolute path."""
    p = check_output(path, kind, overwrite)
    check_writable_dir(p)
    if not OUTPUT_KINDS[kind][2] and _marker(p) is None:
        from tdmpc_jax import atomic
        atomic.write_file(os.path.join(p, MARKER), json.dumps({"kind": kind, "written_by": "tdmpc_jax"}))
    return p


def check_writable_dir(path: str):
    """Create `path` if needed and prove it is writable (fails before any long work)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"output directory {path!r} is not writable: {e.strerror or e}") from None


def _atomic_write(path: str, write):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_results(out_dir: str, results: dict):
    check_writable_dir(out_dir)
    _atomic_write(os.path.join(out_dir, "results.json"), lambda f: json.dump(results, f, indent=1))

    def rows(f):
        w = csv.writer(f)
        w.writerow(["task", "episode", "return", "task_mean", "task_score"])
        for t, v in results["tasks"].items():
            for i, r in enumerate(v["returns"]):
                w.writerow([t, i, f"{r:.4f}", f"{v['mean']:.4f}", f"{v['score']:.4f}"])
    _atomic_write(os.path.join(out_dir, "results.csv"), rows)


def read_results(out_dir: str) -> dict:
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no results.json in {out_dir!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt results ({e})") from None
    if "tasks" not in res or "normalized_score" not in res:
        raise ValueError(f"{path}: not an evaluation result")
    return res
