"""Read PyTorch `torch.save` zip checkpoints into NumPy arrays without PyTorch installed.

The pickle is read by a restricted unpickler: the only globals it resolves are the names needed to
rebuild tensors (storage types, `_rebuild_tensor_v2`, `_rebuild_qtensor`, `_rebuild_parameter`,
OrderedDict, torch.Size/device, the per-tensor/per-channel qschemes), each mapped to an object made
afresh for that load. Any other global raises CheckpointError before anything is called. The file may
only fill containers it built itself (BUILD/SETITEM(S)/APPEND(S) on anything else is refused, as are
opcodes a tensor checkpoint never needs), and every size it declares is checked against fixed caps
(MAX_INFLATE_RATIO, MAX_PICKLE_BYTES, MAX_PICKLE_OPS) before anything is read or allocated.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict

import numpy as np

from tdmpc_jax.checkpoints.errors import CheckpointError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "QInt8Storage": np.int8, "QUInt8Storage": np.uint8, "QInt32Storage": np.int32,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self):
        dt = STORAGE_DTYPES[self.name]
        if dt == "bfloat16":
            import ml_dtypes
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(dt)


@dataclasses.dataclass(frozen=True)
class QScheme:
    name: str


@dataclasses.dataclass
class QuantizedTensor:
    """A torch quantized tensor as stored: integer values plus its affine quantizer."""

    int_repr: np.ndarray
    scheme: str
    scale: Any
    zero_point: Any
    axis: int = -1

    def dequantize(self) -> np.ndarray:
        q = self.int_repr.astype(np.float32)
        if self.scheme == "per_tensor_affine":
            return (q - np.float32(self.zero_point)) * np.float32(self.scale)
        shape = [1] * q.ndim
        shape[self.axis] = -1
        s = np.asarray(self.scale, np.float32).reshape(shape)
        z = np.asarray(self.zero_point, np.float32).reshape(shape)
        return (q - z) * s

    @property
    def shape(self):
        return self.int_repr.shape


class TorchSize(tuple):
    """Stand-in for torch.Size (a tuple)."""


@dataclasses.dataclass(frozen=True)
class TorchDevice:
    spec: str


def _strided(flat: np.ndarray, offset, size, stride, charge=None) -> np.ndarray:
    """The tensor view (offset, size, stride) of a storage, as a contiguous array.

    charge(nbytes) is called with the size of the result before anything is allocated (the load's
    memory budget): a zero-stride view of a one-element storage can declare terabytes.
    """
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(st < 0 for st in stride):
        raise ValueError(f"bad tensor view (size {size}, stride {stride})")
    if not 0 <= offset <= flat.size:
        raise ValueError(f"tensor offset {offset} outside its storage of {flat.size} elements")
    numel = 1
    for n in size:
        numel *= n
    if charge is not None:
        charge(numel * flat.itemsize, f"tensor of shape {size}")
    if len(size) == 0:
        return flat[offset].copy()
    if numel == 0:
        return np.zeros(size, flat.dtype)
    need = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
    if need > flat.size:
        raise ValueError(f"tensor view (offset {offset}, size {size}, stride {stride}) "
                         f"exceeds its storage of {flat.size} elements")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(s * item for s in stride))
    return np.ascontiguousarray(view)


def _quantized(vals, qparams):
    scheme = qparams[0].name if isinstance(qparams[0], QScheme) else str(qparams[0])
    if scheme == "per_tensor_affine":
        return QuantizedTensor(vals, scheme, float(qparams[1]), int(qparams[2]))
    if scheme in ("per_channel_affine", "per_channel_affine_float_qparams"):
        return QuantizedTensor(vals, "per_channel_affine", np.asarray(qparams[1]), np.asarray(qparams[2]),
                               int(qparams[3]))
    raise ValueError(f"unsupported quantization scheme {scheme!r}")


@dataclasses.dataclass(frozen=True)
class _TensorDictClass:
    """Stand-in for tensordict.TensorDict: a TensorDict pickle rebuilds into a plain dict of arrays."""


def _make_td(cls, state):
    """tensordict's `_make_td(cls, state)`: keep the tensors of state['_tensordict'] (nested dicts)."""
    if not isinstance(state, dict) or not isinstance(state.get("_tensordict"), dict):
        raise ValueError("unsupported TensorDict layout")
    return dict(state["_tensordict"])


# --- limits (documented in the README's "Safety" section) -------------------------------------------
# Everything a load allocates -- pickle record, storage records, materialized tensors -- is charged
# against MAX_INFLATE_RATIO x the file's size on disk (+ BUDGET_SLACK), and every zip member read must
# declare at most MAX_INFLATE_RATIO x its compressed size (+ BUDGET_SLACK). Declared sizes are checked
# before anything is read or allocated.
MAX_INFLATE_RATIO = 32
BUDGET_SLACK = 1 << 20
MAX_PICKLE_BYTES = 16 << 20  # data.pkl holds structure only (tensor data lives in data/<key> records)
MAX_PICKLE_OPS = 1_000_000  # bounds the Python objects a pickle can create
_CHUNK = 1 << 20


def _load_globals(charge, owned):
    """Fresh objects for one load: the only globals a checkpoint may name. Nothing here outlives it."""
    def ordered_dict(*args):
        return owned(collections.OrderedDict(*args))

    def rebuild_tensor_v2(storage, offset, size, stride, *_):  # also torch's older _rebuild_tensor
        return _strided(storage, offset, size, stride, charge)

    def rebuild_parameter(data, *_):  # requires_grad, hooks, state: nothing to keep
        return data

    def rebuild_qtensor(storage, offset, size, stride, qparams, *_):
        return _quantized(_strided(storage, offset, size, stride, charge), qparams)

    def make_td(cls, state):
        if not isinstance(cls, _TensorDictClass):
            raise ValueError("unsupported TensorDict layout")
        return _make_td(cls, state)

    g = {
        ("collections", "OrderedDict"): ordered_dict,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        ("torch._utils", "_rebuild_qtensor"): rebuild_qtensor,
        ("torch", "Size"): lambda *a: TorchSize(*a),
        ("torch", "device"): lambda *a: TorchDevice(":".join(str(x) for x in a)),
        # official TD-MPC2 datasets are torch.save'd TensorDicts: their data only, no TensorDict code runs
        ("tensordict._td", "TensorDict"): _TensorDictClass(),
        ("tensordict._reductions", "_make_td"): make_td,
    }
    g.update({("torch", q): QScheme(q) for q in
              ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams")})
    g.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})
    return g


class _Refused(pickle.UnpicklingError):
    pass


def _sized_loader(fmt, make):
    """A length-prefixed opcode (BINBYTES8, BINUNICODE, LONG4...): the length is checked against the
    bytes left in the pickle before anything is allocated or read."""
    nlen = struct.calcsize(fmt)

    def load(self):
        n, = struct.unpack(fmt, self._read_exact(nlen))
        self.append(make(self, self._read_exact(n)))
    return load


def _refuse(what):
    def load(self):
        raise _Refused(f"refuses {what} (not needed by a tensor checkpoint)")
    return load


class _RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: its opcode table is ours to set
    """Only data opcodes, plus calls to this load's allowlisted functions; the file may mutate only the
    containers it built itself (BUILD/SETITEM(S)/APPEND(S)/ADDITEMS on anything else is refused)."""

    def __init__(self, data: bytes, load_record, charge):
        super().__init__(io.BytesIO(data))
        self._size = len(data)
        self._load_record = load_record
        self._charge = charge
        self._storages: Dict[str, np.ndarray] = {}
        self._owned: Dict[int, Any] = {}  # id -> object (kept alive so ids stay unique)
        self._globals = _load_globals(charge, self._own)
        self._callables = {id(v) for v in self._globals.values() if callable(v)}
        self._ops = 0

    def _own(self, obj):
        self._owned[id(obj)] = obj
        return obj

    def _target(self, op, kinds):
        obj = self.stack[-1]
        if self._owned.get(id(obj)) is not obj or type(obj) not in kinds:
            raise _Refused(f"refuses {op} on {type(obj).__name__} (only on containers the pickle built itself)")
        return obj

    def _read_exact(self, n):
        if n < 0 or n > self._size:
            raise _Refused(f"opcode declares {n} bytes in a pickle of {self._size}")
        b = self.read(n)
        if len(b) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        return b

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refuses to load global '{module}.{name}' (only tensor-rebuild names are allowed)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        key, dtype = str(key), stype.dtype
        if key not in self._storages:
            flat = np.frombuffer(self._load_record(key, int(numel), dtype.itemsize), dtype=dtype)
            flat.flags.writeable = False  # shared by every view of it
            self._storages[key] = flat
        elif self._storages[key].dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is used as {self._storages[key].dtype} and {dtype}")
        return self._storages[key]

    # -- opcodes that change the table of pickle._Unpickler --
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callables or type(args) is not tuple:
            raise _Refused(f"refuses to call {type(func).__name__} (only the allowlisted tensor-rebuild names)")
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        self._target("BUILD", (collections.OrderedDict,))
        if state is not None and type(state) is not dict:
            raise _Refused(f"refuses BUILD with a {type(state).__name__} state")
        # torch state dicts carry `_metadata` (module versions) here: the reader does not need it

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target("SETITEM", (dict, collections.OrderedDict))[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        d = self._target("SETITEMS", (dict, collections.OrderedDict))
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        self._target("APPEND", (list,)).append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target("APPENDS", (list,)).extend(items)

    def load_additems(self):
        items = self.pop_mark()
        self._target("ADDITEMS", (set,)).update(items)

    def load_frame(self):
        n, = struct.unpack("<Q", self._read_exact(8))
        if n > self._size:
            raise _Refused(f"opcode declares {n} bytes in a pickle of {self._size}")
        self._unframer.load_frame(n)


def _registers_new(base):
    def load(self):
        base(self)
        self._own(self.stack[-1])
    return load


def _counted(f):
    def op(self):
        self._ops += 1
        if self._ops > MAX_PICKLE_OPS:
            raise _Refused(f"pickle runs more than {MAX_PICKLE_OPS} opcodes")
        f(self)
    return op


def _opcode_table():
    """All 256 opcodes: data opcodes as in pickle, the mutating ones checked, the rest refused."""
    P, U = pickle._Unpickler, _RestrictedUnpickler
    code = {n: getattr(pickle, n)[0] for n in dir(pickle)
            if n.isupper() and isinstance(getattr(pickle, n), bytes) and len(getattr(pickle, n)) == 1}
    keep = ("PROTO STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG FLOAT "
            "BINFLOAT STRING UNICODE EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 FROZENSET GET BINGET LONG_BINGET "
            "PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL PERSID BINPERSID").split()
    table = {code[n]: P.dispatch[code[n]] for n in keep}
    table.update({code["REDUCE"]: U.load_reduce, code["BUILD"]: U.load_build, code["SETITEM"]: U.load_setitem,
                  code["SETITEMS"]: U.load_setitems, code["APPEND"]: U.load_append,
                  code["APPENDS"]: U.load_appends, code["ADDITEMS"]: U.load_additems,
                  code["FRAME"]: U.load_frame})
    for n in ("EMPTY_LIST", "LIST", "EMPTY_DICT", "DICT", "EMPTY_SET"):
        table[code[n]] = _registers_new(P.dispatch[code[n]])

    def utf8(self, b):
        return str(b, "utf-8", "surrogatepass")

    def decode_string(self, b):
        return self._decode_string(b)

    def long(self, b):
        return pickle.decode_long(b)

    for n, fmt, make in (
            ("BINBYTES", "<I", bytes), ("SHORT_BINBYTES", "<B", bytes), ("BINBYTES8", "<Q", bytes),
            ("BYTEARRAY8", "<Q", lambda self, b: self._own(bytearray(b))),
            ("BINUNICODE", "<I", utf8), ("SHORT_BINUNICODE", "<B", utf8), ("BINUNICODE8", "<Q", utf8),
            ("BINSTRING", "<i", decode_string), ("SHORT_BINSTRING", "<B", decode_string),
            ("LONG1", "<B", long), ("LONG4", "<i", long)):
        table[code[n]] = _sized_loader(fmt, (lambda self, b: b) if make is bytes else make)
    names = {c: n for n, c in code.items()}
    return {c: _counted(table.get(c) or _refuse(names.get(c, f"opcode {c:#04x}"))) for c in range(256)}


_RestrictedUnpickler.dispatch = _opcode_table()


class _ZipReader:
    """Reads zip members with every declared size checked against the load's budget before reading."""

    def __init__(self, path, zf: zipfile.ZipFile):
        self.zf = zf
        try:
            self.disk = os.fstat(zf.fp.fileno()).st_size
        except (AttributeError, OSError, io.UnsupportedOperation):  # a file object without a descriptor
            self.disk = zf.fp.seek(0, io.SEEK_END)
        self.budget = MAX_INFLATE_RATIO * self.disk + BUDGET_SLACK
        self.spent = 0

    def charge(self, nbytes, what):
        if nbytes > self.budget - self.spent:
            raise _Refused(f"{what} needs {nbytes} bytes: over the cap of {MAX_INFLATE_RATIO} x the file size "
                           f"({self.disk} bytes) on what one load may allocate")
        self.spent += nbytes

    def read(self, name, limit=None):
        """Member `name` as a bytearray, its declared sizes checked before anything is read."""
        info = self.zf.getinfo(name)
        size = info.file_size
        if limit is not None and size > limit:
            raise _Refused(f"{name} declares {size} bytes (more than the cap of {limit})")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refused(f"{name} uses an unsupported zip compression (type {info.compress_type})")
        if info.compress_size > self.disk or size > MAX_INFLATE_RATIO * info.compress_size + BUDGET_SLACK:
            raise _Refused(f"{name} declares {size} bytes but is stored in {info.compress_size}: over the cap of "
                           f"{MAX_INFLATE_RATIO}x expansion")
        self.charge(size, name)
        buf = bytearray(size)
        view, pos = memoryview(buf), 0
        with self.zf.open(info) as f:
            while pos < size:  # bounded reads: zipfile would otherwise inflate up to 2 GiB per call
                chunk = f.read(min(_CHUNK, size - pos))
                if not chunk:
                    break
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        if pos != size:
            raise zipfile.BadZipFile(f"{name} is truncated ({pos} of {size} bytes)")
        return buf


def read_torch_file(path) -> Any:
    """Load a `torch.save` zip file as nested Python containers of np.ndarray / QuantizedTensor.

    Nothing in the file is executed and nothing outside this load is changed by it; declared sizes are
    checked against the caps above before anything is read (see `_RestrictedUnpickler`, `_ZipReader`).
    """
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a .pt file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(path, f"not a PyTorch zip checkpoint (truncated or corrupt file: {e})") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(path, "zip file is not a PyTorch checkpoint (no single data.pkl record)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        reader = _ZipReader(path, zf)

        def load_record(key, numel, itemsize):
            rec = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(rec)
            except KeyError:
                raise pickle.UnpicklingError(f"missing tensor record {rec}") from None
            if info.file_size != numel * itemsize:  # before reading: the record's size is declared
                raise pickle.UnpicklingError(
                    f"storage {key} holds {info.file_size} bytes, expected {numel} x {itemsize}")
            return reader.read(rec)

        try:
            if byteorder in names and bytes(reader.read(byteorder, limit=64)).strip() not in (b"little", b""):
                raise CheckpointError(path, "big-endian checkpoints are not supported")
            data = reader.read(pkl[0], limit=MAX_PICKLE_BYTES)
            return _RestrictedUnpickler(data, load_record, reader.charge).load()
        except CheckpointError:
            raise
        except Exception as e:  # hostile input raises many types: report every one as one line
            known = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                     zipfile.BadZipFile, OSError)
            msg = str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}"
            raise CheckpointError(path, " ".join(f"cannot unpickle: {msg}".split())[:500]) from None
