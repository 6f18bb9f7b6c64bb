"""Hostile `.pt` files: state poisoning and memory bombs, built by hand (pickle opcodes, zip bytes).

Every crafted file must be refused with the reader's one-line CheckpointError, must leave the reader
exactly as it was (a later load of the genuine checkpoint is unchanged), and must be refused before
any large allocation (peak RSS measured in a subprocess).
"""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import tdmpc_jax
from tdmpc_jax import CheckpointError
from tdmpc_jax.checkpoints import torch_reader
from tdmpc_jax.checkpoints.torch_reader import QuantizedTensor, read_torch_file

from conftest import FP16_CKPT, INT8_CKPT, REPO

# --- hand-made pickles and zips --------------------------------------------------------------------


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v):
    if -2 ** 31 <= v < 2 ** 31:
        return b"J" + struct.pack("<i", v)
    b = v.to_bytes(9, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b  # LONG1


def _tuple(items):
    return b"(" + b"".join(items) + b"t"


def _dict(items):
    return b"}(" + b"".join(_str(k) + v for k, v in items.items()) + b"u"


def _tensor(numel, size, stride, storage="FloatStorage", key="0"):
    """torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()) as torch.save writes it."""
    pid = _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel)])
    args = _tuple([pid + b"Q", _int(0), _tuple([_int(s) for s in size]), _tuple([_int(s) for s in stride]),
                   b"\x89", _global("collections", "OrderedDict") + b")R"])
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _pickle(body):
    return b"\x80\x02" + body + b"."


def _zip(path, members):
    """Write a zip by hand. members: [(name, payload, method, crc32, uncompressed_size)]."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, usize in members:
        n = name.encode()
        offset = len(out)
        out += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, method, 0, 33, crc, len(payload), usize,
                           len(n), 0) + n + payload
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, method, 0, 33, crc,
                               len(payload), usize, len(n), 0, 0, 0, 0, 0o644 << 16, offset) + n
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central),
                                 len(out), 0)
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


def _stored(name, data):
    return (name, data, 0, zlib.crc32(data), len(data))


def _pt(path, pkl, records=()):
    """A torch.save-layout zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    return _zip(path, [_stored("archive/data.pkl", pkl), _stored("archive/byteorder", b"little")] +
                [_stored(f"archive/data/{k}", v) for k, v in records])


# --- state poisoning -------------------------------------------------------------------------------

def _build_on(module, name, state):
    return _pickle(_global(module, name) + state + b"b")


POISON = {
    # the HalfStorage allowlist entry would read every later fp16 checkpoint as bfloat16
    "storage-dtype": _build_on("torch", "HalfStorage", _dict({"name": _str("BFloat16Storage")})),
    # the per-tensor qscheme entry would make every later int8 checkpoint unloadable
    "qscheme": _build_on("torch", "per_tensor_affine", _dict({"name": _str("per_channel_affine")})),
    # BUILD's slot state is setattr: function defaults and attributes
    "function-defaults": _build_on("torch._utils", "_rebuild_tensor_v2",
                                   b"N" + _dict({"__defaults__": _tuple([_int(7)])}) + b"\x86"),
    "function-dict": _build_on("collections", "OrderedDict", _dict({"poisoned": b"\x88"})),
    "tensordict-class": _build_on("tensordict._td", "TensorDict", _dict({"x": _int(1)})),
}


def _function_state():
    out = {}
    for k, f in sorted(vars(torch_reader).items()):
        if callable(f) and hasattr(f, "__defaults__"):
            out[k] = (f.__defaults__, f.__kwdefaults__, dict(f.__dict__))
    return out


def _assert_same_tree(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, QuantizedTensor):
        assert (a.scheme, a.scale, a.zero_point, a.axis) == (b.scheme, b.scale, b.zero_point, b.axis)
        _assert_same_tree(a.int_repr, b.int_repr)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def genuine():
    return {p: read_torch_file(p)["model"] for p in (FP16_CKPT, INT8_CKPT)}


@pytest.mark.parametrize("which", sorted(POISON))
def test_build_on_an_allowlisted_global_is_refused_and_changes_nothing(tmp_path, genuine, which):
    funcs = _function_state()
    p = _pt(tmp_path / f"{which}.pt", POISON[which])
    with pytest.raises(CheckpointError, match=rf"{which}\.pt: cannot unpickle: refuses BUILD"):
        read_torch_file(p)
    with pytest.raises(CheckpointError, match="refuses BUILD"):
        tdmpc_jax.load_checkpoint(p)
    assert _function_state() == funcs
    for path, before in genuine.items():
        after = read_torch_file(path)["model"]
        _assert_same_tree(before, after)
    assert read_torch_file(FP16_CKPT)["model"]["_encoder.state.0.weight"].dtype == np.float16


def test_genuine_fp16_weights_survive_a_poisoning_attempt(tmp_path, genuine):
    """The issue's scenario end to end: poisoning file, then the genuine fp16 checkpoint loads right."""
    before = tdmpc_jax.load_checkpoint(FP16_CKPT)
    with pytest.raises(CheckpointError):
        tdmpc_jax.load_checkpoint(_pt(tmp_path / "p.pt", POISON["storage-dtype"]))
    after = tdmpc_jax.load_checkpoint(FP16_CKPT)
    import jax
    for (k, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(before.params),
                              jax.tree_util.tree_leaves_with_path(after.params)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(k))


def test_setitem_into_a_tensor_is_refused(tmp_path):
    # a non-contiguous view (stride 2) is materialized as a writable copy: SETITEM would write into it
    body = _tensor(4, (2,), (2,)) + _int(0) + _int(5) + b"s"
    p = _pt(tmp_path / "setitem.pt", _pickle(body), [("0", np.arange(4, dtype=np.float32).tobytes())])
    with pytest.raises(CheckpointError, match="refuses SETITEM"):
        read_torch_file(p)


@pytest.mark.parametrize("op", ["APPEND", "APPENDS"])
def test_append_onto_a_global_is_refused(tmp_path, op):
    body = _global("collections", "OrderedDict") + (_int(1) + b"a" if op == "APPEND" else b"(" + _int(1) + b"e")
    with pytest.raises(CheckpointError, match="refuses APPEND"):
        read_torch_file(_pt(tmp_path / "append.pt", _pickle(body)))


def test_setitems_on_reader_built_containers_still_work(tmp_path):
    # plain dicts/lists the pickle builds itself, and an OrderedDict with torch's `_metadata` BUILD
    od = _global("collections", "OrderedDict") + b")R" + _dict({"_metadata": _dict({"": _int(1)})}) + b"b"
    body = _dict({"a": b"](" + _int(1) + _int(2) + b"e" + _int(3) + b"a", "b": od + _str("x") + _int(4) + b"s"})
    got = read_torch_file(_pt(tmp_path / "ok.pt", _pickle(body)))
    assert got == {"a": [1, 2, 3], "b": {"x": 4}}


@pytest.mark.parametrize("opcode", [b"\x81", b"\x92", b"\x82\x01", b"\x97"])  # NEWOBJ, NEWOBJ_EX, EXT1, NEXT_BUFFER
def test_opcodes_a_checkpoint_never_needs_are_refused(tmp_path, opcode):
    body = _global("torch", "Size") + b")" + opcode
    with pytest.raises(CheckpointError, match="cannot unpickle"):
        read_torch_file(_pt(tmp_path / "op.pt", _pickle(body)))


# --- memory bombs ----------------------------------------------------------------------------------

def _zero_stride_bomb(path, size):
    return _pt(path, _pickle(_tensor(1, size, (0,) * len(size))), [("0", b"\0\0\0\0")])


_GIB2 = 2 ** 31
_ZEROS_2GIB_CRC = 0x4DBDF21C  # zlib.crc32(bytes(2 ** 31))


def _zip_bomb(path):
    """A ~2.1 MB zip whose float32 storage record inflates to 2 GiB of zeros (and says so honestly)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)  # self-contained: repeatable
    payload = block * (_GIB2 >> 20) + co.flush()
    pkl = _pickle(_tensor(_GIB2 // 4, (_GIB2 // 4,), (1,)))
    return _zip(path, [_stored("archive/data.pkl", pkl), _stored("archive/byteorder", b"little"),
                       ("archive/data/0", payload, 8, _ZEROS_2GIB_CRC, _GIB2)])


def _binbytes8_bomb(path):
    return _pt(path, b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"abc.")


BOMBS = {
    "zero-stride-2^15x2^14": lambda p: _zero_stride_bomb(p, (2 ** 15, 2 ** 14)),
    "zero-stride-2^20x2^20": lambda p: _zero_stride_bomb(p, (2 ** 20, 2 ** 20)),
    "zip-2GiB": _zip_bomb,
    "binbytes8-2^40": _binbytes8_bomb,
}

# The reader alone (numpy + stdlib): a stub parent package keeps jax/flax out of the baseline RSS.
# Peak RSS is the process's VmHWM (ru_maxrss on Linux keeps the parent's peak across fork + exec).
_MEASURE = r"""
import json, os, resource, sys, types
pkg = types.ModuleType("tdmpc_jax")
pkg.__path__ = [os.path.join(os.getcwd(), "tdmpc_jax")]
sys.modules["tdmpc_jax"] = pkg
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.checkpoints.torch_reader import read_torch_file

def peak_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base = peak_mb()
try:
    read_torch_file(sys.argv[1])
    msg = "loaded without error"
except CheckpointError as e:
    msg = "CheckpointError: " + str(e)
except BaseException as e:
    msg = "UNCAUGHT %s: %s" % (type(e).__name__, str(e)[:200])
print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "msg": msg,
                  "modules": sorted(m.split(".")[0] for m in sys.modules)}))
"""


def _measure(path):
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", sorted(BOMBS))
def test_memory_bombs_are_refused_before_allocating(tmp_path, which):
    path = BOMBS[which](tmp_path / "bomb.pt")
    size = os.path.getsize(path)
    assert size < 2_200_000
    m = _measure(path)
    print(f"{which}: file {size} bytes, RSS {m['base_mb']:.0f} MB after imports, peak {m['peak_mb']:.0f} MB: "
          f"{m['msg']}")
    assert m["msg"].startswith(f"CheckpointError: {path}: "), m
    assert "\n" not in m["msg"]
    assert "jax" not in m["modules"]
    assert m["peak_mb"] < 300 and m["peak_mb"] - m["base_mb"] < 64, m


def test_declared_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    """In-process: the refusals above happen before any storage record is read."""
    import zipfile
    reads = []
    orig = zipfile.ZipFile.open

    def spy(self, name, *a, **k):
        reads.append(getattr(name, "filename", name))
        return orig(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    p = _zip_bomb(tmp_path / "bomb.pt")
    with pytest.raises(CheckpointError, match=r"data/0 declares 2147483648 bytes"):
        read_torch_file(p)
    assert not any(r.endswith("data/0") for r in reads)
    # a record whose declared size disagrees with numel x itemsize is refused before reading, too
    p = _pt(tmp_path / "short.pt", _pickle(_tensor(4, (4,), (1,))), [("0", bytes(12))])
    reads.clear()
    with pytest.raises(CheckpointError, match="holds 12 bytes, expected 4 x 4"):
        read_torch_file(p)
    assert not any(r.endswith("data/0") for r in reads)


def test_budget_leaves_genuine_views_alone(tmp_path):
    # an expanded (stride-0) view of modest size and overlapping views are fine
    body = _dict({"e": _tensor(1, (3, 4), (0, 0), key="1"), "v": _tensor(4, (3, 2), (1, 1))})
    got = read_torch_file(_pt(tmp_path / "views.pt", _pickle(body),
                              [("0", np.arange(4, dtype=np.float32).tobytes()), ("1", bytes(4))]))
    np.testing.assert_array_equal(got["e"], np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(got["v"], [[0, 1], [1, 2], [2, 3]])


def test_truncated_and_oversized_opcodes(tmp_path):
    for name, pkl in {"short": b"\x80\x02X\x10\x00\x00\x00abc.", "long4": b"\x80\x02\x8b\xff\xff\xff\x7f.",
                      "frame": b"\x80\x04\x95" + struct.pack("<Q", 2 ** 50) + b"N."}.items():
        with pytest.raises(CheckpointError, match=rf"{name}\.pt: cannot unpickle"):
            read_torch_file(_pt(tmp_path / f"{name}.pt", pkl))
