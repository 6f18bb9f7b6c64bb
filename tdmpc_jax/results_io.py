"""Write evaluation results atomically as JSON + CSV; read them back for comparisons."""
from __future__ import annotations

import csv
import json
import os
import tempfile


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
