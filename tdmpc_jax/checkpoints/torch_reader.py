"""Read PyTorch `torch.save` zip checkpoints into NumPy arrays without PyTorch installed.

The pickle is read by a restricted unpickler: the only globals it resolves are the names needed to
rebuild tensors (storage types, `_rebuild_tensor_v2`, `_rebuild_qtensor`, `_rebuild_parameter`,
OrderedDict, torch.Size/device, the per-tensor/per-channel qschemes), each mapped to a function of
this module. Any other global raises CheckpointError before anything is called.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickle
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


def _strided(flat: np.ndarray, offset, size, stride) -> np.ndarray:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) == 0:
        return flat[offset].copy()
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    need = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
    if need > flat.size or offset < 0 or any(st < 0 for st in stride):
        raise ValueError(f"tensor view (offset {offset}, size {size}, stride {stride}) "
                         f"exceeds its storage of {flat.size} elements")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(s * item for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _strided(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):
    return _strided(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, hooks=None, state=None):
    return data


def _rebuild_qtensor(storage, offset, size, stride, qparams, requires_grad=False, hooks=None):
    vals = _strided(storage, offset, size, stride)
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


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch", "Size"): lambda *a: TorchSize(*a),
    ("torch", "device"): lambda *a: TorchDevice(":".join(str(x) for x in a)),
    ("torch", "per_tensor_affine"): QScheme("per_tensor_affine"),
    ("torch", "per_channel_affine"): QScheme("per_channel_affine"),
    ("torch", "per_channel_affine_float_qparams"): QScheme("per_channel_affine_float_qparams"),
    # official TD-MPC2 datasets are torch.save'd TensorDicts: their data only, no TensorDict code runs
    ("tensordict._td", "TensorDict"): _TensorDictClass(),
    ("tensordict._reductions", "_make_td"): _make_td,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load_record):
        super().__init__(io.BytesIO(data))
        self._load_record = load_record
        self._storages: Dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refuses to load global '{module}.{name}' (only tensor-rebuild names are allowed)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        key = str(key)
        if key not in self._storages:
            raw = self._load_record(key)
            dtype = stype.dtype
            if len(raw) != int(numel) * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {key} holds {len(raw)} bytes, expected {int(numel)} x {dtype.itemsize}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype)
        return self._storages[key]


def read_torch_file(path) -> Any:
    """Load a `torch.save` zip file as nested Python containers of np.ndarray / QuantizedTensor."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a .pt file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(path, f"not a PyTorch zip checkpoint (truncated or corrupt file: {e})") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(path, "zip file is not a PyTorch checkpoint (no single data.pkl record)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(path, "big-endian checkpoints are not supported")

        def load_record(key):
            rec = f"{prefix}data/{key}"
            try:
                return zf.read(rec)
            except KeyError:
                raise pickle.UnpicklingError(f"missing tensor record {rec}") from None

        try:
            return _RestrictedUnpickler(zf.read(pkl[0]), load_record).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(path, f"cannot unpickle: {e}") from None
