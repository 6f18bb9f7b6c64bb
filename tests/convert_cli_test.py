"""experiments/convert.py end to end: summary counts, conversion, one-line errors."""
import os
import subprocess
import sys

import pytest

import tdmpc_jax

from conftest import FP16_CKPT, REPO

SCRIPT = os.path.join(REPO, "experiments", "convert.py")


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def test_summary_prints_official_counts():
    r = _run(f"--input={FP16_CKPT}", "--summary")
    assert r.returncode == 0, r.stderr
    counts = {line.split()[0]: line.split()[-1] for line in r.stdout.splitlines() if line.startswith("  ")}
    assert counts["learnable"] == "1,426,427" and counts["target"] == "553,930"
    assert counts["total"] == "1,980,357" and counts["qs"] == "553,930"
    assert "model_size: 1  task_set: mt30" in r.stdout


def test_convert_to_orbax_and_export_pt(tmp_path):
    out = tmp_path / "ckpt"
    r = _run(f"--input={FP16_CKPT}", f"--output={out}")
    assert r.returncode == 0, r.stderr
    pt = tmp_path / "back.pt"
    r = _run(f"--input={out}", f"--output={pt}", "--export_format=new")
    assert r.returncode == 0, r.stderr
    a, b = tdmpc_jax.load_checkpoint(out), tdmpc_jax.load_checkpoint(pt)
    assert b.metadata["source_format"] == "new"
    import numpy as np
    np.testing.assert_array_equal(a.params["pi_head"]["layer_2"]["kernel"], b.params["pi_head"]["layer_2"]["kernel"])


@pytest.mark.parametrize("bad,needle", [("/nonexistent.pt", "no such file"), (__file__, "not a PyTorch zip")])
def test_bad_input_one_line_error(bad, needle, tmp_path):
    r = _run(f"--input={bad}", f"--output={tmp_path / 'x'}")
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
