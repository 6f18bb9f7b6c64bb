"""Console commands (setup.cfg `[options.entry_points] console_scripts`): `tdmpc-jax-<name> --flags` runs
experiments/<name>.py exactly as `python experiments/<name>.py --flags` does.

The experiments stay plain absl scripts (flags defined at import, `cli.run(main)` under `__main__`), so a
command runs its script file with `runpy` as `__main__` (same `__file__`, flags, errors and exit codes)
rather than importing it as a module. The scripts are files of the checkout: the commands need the
package installed from one in editable mode (`pip install -e .`, what `make install` does).
"""
from __future__ import annotations

import os
import runpy
import sys

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def script_path(name: str) -> str:
    return os.path.join(EXPERIMENTS, f"{name}.py")


def run_script(name: str):
    """Run experiments/<name>.py as `__main__` with this process's command line (sys.argv[1:])."""
    path = script_path(name)
    if not os.path.isfile(path):
        print(f"error: {path}: not found; the tdmpc-jax-* commands run the experiments/ scripts of a checkout "
              f"installed with `pip install -e .`", file=sys.stderr)
        sys.exit(1)
    runpy.run_path(path, run_name="__main__")


def _command(name: str):
    def command():
        run_script(name)
    command.__name__ = command.__qualname__ = name
    command.__doc__ = f"tdmpc-jax-{name.replace('_', '-')}: experiments/{name}.py"
    return command


collect = _command("collect")
convert = _command("convert")
distill = _command("distill")
evaluate = _command("evaluate")
export = _command("export")
import_dataset = _command("import_dataset")
pipeline = _command("pipeline")
plan_fidelity = _command("plan_fidelity")
quantize = _command("quantize")
render = _command("render")
study = _command("study")
train_online = _command("train_online")
