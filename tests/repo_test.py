"""The repository tests itself: every fixture is committed inside it, nothing reads ../shared."""
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

import conftest
from conftest import REPO

FIXTURES = [conftest.FP16_CKPT, conftest.INT8_CKPT, conftest.MIXED_CKPT, conftest.MODEL_OUTPUTS, conftest.ENV_REPLAY]


def _repo_files():
    """The files a clone gets once the tree is committed: tracked + untracked-but-not-ignored."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")  # e.g. an sdist; nothing to compare against
    return [f for f in r.stdout.decode().split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def test_fixtures_are_inside_the_repository_and_not_ignored():
    files = set(_repo_files())
    for path in FIXTURES:
        rel = os.path.relpath(path, REPO)
        assert not rel.startswith(".."), f"{path} lies outside the repository"
        assert rel in files, f"{rel} is missing or git-ignored: a clone would not have it"
    for readme in ("checkpoints/td-mpc-opt/README.md", "checkpoints/td-mpc-opt/LICENSE", "tests/data/reference/README.md"):
        assert readme in files


def test_released_checkpoints_match_their_published_sha256():
    readme = open(os.path.join(REPO, "checkpoints", "td-mpc-opt", "README.md")).read()
    for path in (conftest.FP16_CKPT, conftest.INT8_CKPT, conftest.MIXED_CKPT):
        name = os.path.basename(path)
        m = re.search(rf"`{re.escape(name)}` \| `([0-9a-f]{{64}})`", readme)
        assert m, f"no sha256 for {name} in the README"
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == m.group(1)


def test_no_code_path_reads_shared_beside_the_repository():
    pat = re.compile(r"\.\./shared|[\"']shared[\"']|/work/shared")
    hits = []
    for f in _repo_files():
        top = f.split("/")[0]
        if top not in ("tests", "benchmarks", "experiments", "tdmpc_jax", ".ci") and f not in ("README.md", "Makefile"):
            continue
        if f == "tests/repo_test.py" or not f.endswith((".py", ".md", ".sh", "Makefile", "run", ".cfg", ".toml")):
            continue
        for i, line in enumerate(open(os.path.join(REPO, f), errors="replace"), 1):
            if pat.search(line):
                hits.append(f"{f}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_a_clone_with_nothing_beside_it_collects_every_test(tmp_path):
    """Copy what a clone would hold into a directory with no ../shared and collect the suite there."""
    clone = tmp_path / "clone"
    for f in _repo_files():
        if f.startswith(("tests/", "checkpoints/", "experiments/")) or f in ("setup.cfg", "pyproject.toml"):
            dst = clone / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(REPO, f), dst)
    assert not (tmp_path / "shared").exists()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=clone, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ tests? collected", summary) and "error" not in summary, summary


def test_other_files_compile_with_all_optimizations():
    """The -O0 build of conftest.COMPILE_BOUND does not leak into the files that run episodes and loops."""
    import jax
    assert "repo_test.py" not in conftest.COMPILE_BOUND
    assert jax.config.read("jax_disable_most_optimizations") is False
    assert all(os.path.exists(os.path.join(REPO, "tests", f)) for f in conftest.COMPILE_BOUND)
