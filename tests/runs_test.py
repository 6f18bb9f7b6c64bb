"""The run directory's metrics log (JSONL + optional TensorBoard events) and the shared progress display."""
import glob
import importlib.util
import io
import os
import re
import struct
import sys
import time

import pytest

from tdmpc_jax import runs
from tdmpc_jax.progress import Progress

HAVE_WRITER = any(importlib.util.find_spec(m) is not None for m in ("tensorboardX", "tensorboard"))


def _events(path):
    """Every Event of a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        from tensorboard.compat.proto.event_pb2 import Event
    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        e = Event()
        e.ParseFromString(data[i + 12:i + 12 + n])
        out.append(e)
        i += 12 + n + 4
    return out


def _scalars(run_dir):
    """(tag, step, value) of every scalar, and the steps of session START (purge) events, over all files."""
    scalars, starts = [], []
    for p in sorted(glob.glob(str(run_dir / (runs.TB_EVENTS + "*")))):
        for e in _events(p):
            if e.HasField("summary"):
                scalars += [(v.tag, e.step, v.simple_value) for v in e.summary.value]
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                starts.append(e.step)
    return scalars, starts


def _log_rows(tmp_path, upto=0):
    with runs.MetricsLog(tmp_path, upto) as log:
        for step in (1, 2, 3, 4):
            log.append({"step": step, "total_loss": 1.0 / step, "elapsed_s": 0.5 * step})
    return log


def test_metrics_log_writes_jsonl_and_tensorboard_scalars_when_a_writer_is_installed(tmp_path):
    _log_rows(tmp_path)
    assert [r["step"] for r in runs.read_log(tmp_path / runs.METRICS)] == [1, 2, 3, 4]
    files = glob.glob(str(tmp_path / (runs.TB_EVENTS + "*")))
    if not HAVE_WRITER:  # nothing installed: the JSONL only, and no event file
        assert runs.tensorboard_writer(str(tmp_path / "tb")) is None
        assert files == []
        return
    assert len(files) == 1
    scalars, starts = _scalars(tmp_path)
    assert ("total_loss", 3, pytest.approx(1 / 3)) in scalars
    assert ("elapsed_s", 4, pytest.approx(2.0)) in scalars
    assert not any(tag == "step" for tag, _, _ in scalars)  # the step is the x axis, not a scalar
    assert starts == []  # a fresh run purges nothing


def test_resume_truncates_the_log_and_purges_its_tensorboard_events(tmp_path):
    _log_rows(tmp_path)
    with open(tmp_path / runs.METRICS, "a") as f:
        f.write('{"step": 5, "total_lo')  # torn by a kill
    with runs.MetricsLog(tmp_path, 2) as log:  # resumed from the checkpoint at step 2
        assert [r["step"] for r in log.rows()] == [1, 2]
        assert log.elapsed() == 1.0  # the kept rows' time: a resumed run's elapsed_s goes on from there
        log.append({"step": 3, "total_loss": 7.0})
    assert [r["step"] for r in runs.read_log(tmp_path / runs.METRICS)] == [1, 2, 3]
    if HAVE_WRITER:
        scalars, starts = _scalars(tmp_path)
        assert starts == [3]  # TensorBoard hides the killed run's events from step 3 on
        assert ("total_loss", 3, pytest.approx(7.0)) in scalars


def test_without_a_writer_nothing_but_the_jsonl_is_written(tmp_path, monkeypatch):
    for m in ("tensorboardX", "tensorboard"):
        monkeypatch.setitem(sys.modules, m, None)  # `import m` raises ImportError
    assert runs.tensorboard_writer(str(tmp_path)) is None
    _log_rows(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [runs.METRICS]
    assert len(runs.read_log(tmp_path / runs.METRICS)) == 4


def test_progress_eta_leaves_out_the_first_steps_compile_time():
    out = io.StringIO()
    with Progress(12, "updates", initial=1, file=out) as bar:
        time.sleep(1.0)  # the first step: compilation
        bar.update()
        for _ in range(10):
            time.sleep(0.02)
            bar.set_postfix(loss="0.5")
            bar.update()
    text = out.getvalue()
    assert "ETA" in text and "12/12" in text and "loss=0.5" in text
    rate = float(re.findall(r"([\d.]+) updates/s", text)[-1])
    assert rate > 20  # ~50/s from the steps after the first; ~10/s if the 1 s compile counted
    assert "?" in text.split("\r")[2]  # after the first step: no rate yet (it would be the compile's)


def test_progress_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(5, enabled=False, file=out) as bar:
        for _ in range(5):
            bar.update()
        bar.set_postfix(loss=1)
        bar.write("episode done")
    assert out.getvalue() == "" and bar.n == 5


def test_loops_use_the_shared_progress_helper():
    from conftest import REPO
    for mod in ("offline.py", "online.py", "evaluation.py"):
        src = open(os.path.join(REPO, "tdmpc_jax", mod)).read()
        assert "Progress(" in src and "\\r" not in src, mod
