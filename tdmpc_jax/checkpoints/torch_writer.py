"""Write `torch.save`-compatible zip checkpoints from NumPy arrays, without PyTorch.

Emits protocol-2 pickle opcodes by hand (the same globals `torch.save` writes), so official
PyTorch code can load what we export, and tests can build new-format files.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from tdmpc_jax import atomic
from tdmpc_jax.checkpoints.torch_reader import TorchSize

_STORAGE_OF = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
               np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
               np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
               np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
               np.dtype(np.bool_): "BoolStorage"}


class _Emitter:
    def __init__(self):
        self.out = io.BytesIO()
        self.storages = []

    def op(self, b: bytes):
        self.out.write(b)

    def global_(self, module, name):
        self.op(b"c" + f"{module}\n{name}\n".encode())

    def str_(self, s: str):
        b = s.encode("utf-8")
        self.op(b"X" + struct.pack("<I", len(b)) + b)

    def int_(self, v: int):
        v = int(v)
        if -2 ** 31 <= v < 2 ** 31:
            self.op(b"J" + struct.pack("<i", v))
        else:
            b = v.to_bytes(9, "little", signed=True)
            self.op(b"\x8a" + bytes([len(b)]) + b)

    def tuple_(self, items):
        self.op(b"(")
        for x in items:
            self.value(x)
        self.op(b"t")

    def value(self, x: Any):
        if x is None:
            self.op(b"N")
        elif isinstance(x, bool):
            self.op(b"\x88" if x else b"\x89")
        elif isinstance(x, TorchSize):
            self.global_("torch", "Size")
            self.op(b"(")
            self.tuple_(tuple(x))
            self.op(b"tR")
        elif isinstance(x, (int, np.integer)):
            self.int_(x)
        elif isinstance(x, float):
            self.op(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            self.str_(x)
        elif isinstance(x, tuple):
            self.tuple_(x)
        elif isinstance(x, np.ndarray):
            self.tensor(x)
        elif isinstance(x, Mapping):
            self.global_("collections", "OrderedDict")
            self.op(b")R")
            if x:
                self.op(b"(")
                for k, v in x.items():
                    self.value(k)
                    self.value(v)
                self.op(b"u")
        else:
            raise TypeError(f"cannot write a {type(x).__name__} to a torch checkpoint")

    def tensor(self, arr: np.ndarray):
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _STORAGE_OF:
            raise TypeError(f"unsupported dtype {arr.dtype}")
        key = str(len(self.storages))
        self.storages.append(arr)
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(b"(")
        self.op(b"(")
        self.str_("storage")
        self.global_("torch", _STORAGE_OF[arr.dtype])
        self.str_(key)
        self.str_("cpu")
        self.int_(arr.size)
        self.op(b"tQ")  # persistent id
        self.int_(0)
        self.tuple_(tuple(int(s) for s in arr.shape))
        stride = tuple(int(s) // arr.itemsize for s in arr.strides) if arr.ndim else ()
        self.tuple_(stride)
        self.op(b"\x89")  # requires_grad False
        self.global_("collections", "OrderedDict")
        self.op(b")R")
        self.op(b"tR")


def write_torch_file(path, obj: Mapping, archive_name: str = "archive"):
    """Atomically write `obj` (nested dicts of np arrays, ints, strs, None, TorchSize) as a .pt zip."""
    em = _Emitter()
    em.op(b"\x80\x02")
    em.value(obj)
    em.op(b".")
    path = os.fspath(path)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{archive_name}/data.pkl", em.out.getvalue())
            zf.writestr(f"{archive_name}/byteorder", "little")
            for i, arr in enumerate(em.storages):
                zf.writestr(f"{archive_name}/data/{i}", arr.tobytes())
            zf.writestr(f"{archive_name}/version", "3\n")
    atomic.write_file(path, writer=write, binary=True)
    return path
