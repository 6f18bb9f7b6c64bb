"""Console commands: one `tdmpc-jax-<name>` per absl script in experiments/, each resolving to a callable
that runs the script as `python experiments/<name>.py` would."""
import configparser
import glob
import importlib.metadata
import os
import subprocess
import sys

from conftest import REPO


def _declared():
    cp = configparser.ConfigParser()
    cp.read(os.path.join(REPO, "setup.cfg"))
    lines = [l.strip() for l in cp["options.entry_points"]["console_scripts"].splitlines() if l.strip()]
    return dict(tuple(p.strip() for p in l.split("=", 1)) for l in lines)


def _scripts():
    """experiments/*.py that are absl entry points (`cli.run(main)` under __main__)."""
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                  if "cli.run(main)" in open(p).read())


def test_every_experiment_script_has_a_console_command_resolving_to_a_callable():
    from tdmpc_jax import entry_points
    declared = _declared()
    assert sorted(declared) == sorted(f"tdmpc-jax-{s.replace('_', '-')}" for s in _scripts())
    for name, target in declared.items():
        fn = importlib.metadata.EntryPoint(name, target, "console_scripts").load()  # how the launcher resolves it
        assert callable(fn), name
        script = name[len("tdmpc-jax-"):].replace("-", "_")
        assert target == f"tdmpc_jax.entry_points:{script}"
        assert os.path.isfile(entry_points.script_path(script)), script


def test_installed_metadata_matches_setup_cfg_when_reinstalled():
    """An install made after the commands were added lists the same ones (an older install lists none)."""
    try:
        installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                     if e.name.startswith("tdmpc-jax-")}
    except importlib.metadata.PackageNotFoundError:
        installed = {}
    assert installed in ({}, _declared())


def test_a_command_runs_its_script_with_the_scripts_flags_and_errors():
    code = "import sys; from tdmpc_jax.entry_points import evaluate; sys.argv[0] = 'tdmpc-jax-evaluate'; evaluate()"
    r = subprocess.run([sys.executable, "-c", code, "--episodes=0", "--output=/tmp/x"], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: --episodes=0: must be a positive integer"
