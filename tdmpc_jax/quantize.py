"""Post-training quantization of world-model params: fp16, bf16, int8 (per output channel), mixed.

Storage formats (what is saved):
  fp32 / fp16 / bf16: every leaf cast.
  int8: every matmul kernel as {'qvalues': int8 (..., in, out), 'qscale': f32 (..., out)}, symmetric per
        output channel (per Q-ensemble member); biases, LayerNorm and task embeddings stay fp32.
  mixed: int8 kernels except those that measurement shows matter most (kept fp16); the rest fp16.
Compute modes (how a loaded agent runs): 'fp32' dequantizes once at load; 'bf16' keeps bf16 kernels
and runs the matmuls in bf16 with fp32 accumulation (see networks.matmul).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("fp32", "fp16", "bf16", "int8", "mixed")
_FLOAT = {"fp32": np.float32, "fp16": np.float16, "bf16": jnp.bfloat16}


def is_quantized(x) -> bool:
    return isinstance(x, dict) and set(x) == {"qvalues", "qscale"}


def quantize_int8(w) -> dict:
    """Symmetric per-output-channel int8: scale = max|w| over the input axis / 127 (1 for zero channels)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=-2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8)
    return {"qvalues": q, "qscale": scale}


def dequantize_leaf(x):
    if is_quantized(x):
        return x["qvalues"].astype(jnp.float32) * x["qscale"][..., None, :]
    return x.astype(jnp.float32)


def _map(tree, fn, path=()):
    """Map fn(path, leaf) over a params tree, treating quantized dicts as leaves."""
    if is_quantized(tree) or not isinstance(tree, dict):
        return fn(path, tree)
    return {k: _map(v, fn, path + (k,)) for k, v in tree.items()}


def kernel_paths(params) -> List[Tuple[str, ...]]:
    out = []
    _map(params, lambda p, x: out.append(p) if p and p[-1] == "kernel" else None)
    return out


def convert(params, fmt: str, keep_fp16: Iterable[Tuple[str, ...]] = ()):
    """fp32 params -> storage tree in `fmt` (see module doc). `keep_fp16`: kernels mixed keeps in fp16."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    keep = {tuple(k) for k in keep_fp16}

    def leaf(path, x):
        x = np.asarray(x, np.float32)
        if fmt in _FLOAT:
            return x.astype(_FLOAT[fmt])
        is_kernel = bool(path) and path[-1] == "kernel" and x.ndim >= 2
        if is_kernel and not (fmt == "mixed" and path in keep):
            return quantize_int8(x)
        return x.astype(np.float16) if fmt == "mixed" else x
    return _map(params, leaf)


def dequantize(tree):
    """Any storage tree -> fp32 params."""
    return _map(tree, lambda p, x: dequantize_leaf(jnp.asarray(x) if not is_quantized(x) else
                                                   {k: jnp.asarray(v) for k, v in x.items()}))


def for_compute(tree, mode: str = "fp32"):
    """Params to run with: 'fp32' (dequantize once) or 'bf16' (bf16 kernels, bf16 matmuls)."""
    params = dequantize(tree)
    if mode == "fp32":
        return params
    if mode == "bf16":
        return _map(params, lambda p, x: x.astype(jnp.bfloat16) if p and p[-1] == "kernel" else x)
    raise ValueError(f"unknown compute mode {mode!r} (fp32 or bf16)")


def nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def channel_rel_error(w, q: dict) -> np.ndarray:
    """Per output channel max |w - dequant(q)| / max |w|."""
    w = np.asarray(w, np.float32)
    err = np.abs(w - np.asarray(dequantize_leaf({k: jnp.asarray(v) for k, v in q.items()}))).max(axis=-2)
    amax = np.abs(w).max(axis=-2)
    return np.where(amax > 0, err / np.maximum(amax, 1e-30), 0.0)


def validate_storage(tree, path="<params>"):
    """Raise ValueError on a corrupt quantized tree (bad dtypes, non-positive or non-finite scales)."""
    def check(p, x):
        name = "/".join(p)
        if is_quantized(x):
            q, s = np.asarray(x["qvalues"]), np.asarray(x["qscale"])
            if q.dtype != np.int8:
                raise ValueError(f"{path}: {name} qvalues have dtype {q.dtype}, expected int8")
            if s.shape != q.shape[:-2] + q.shape[-1:]:
                raise ValueError(f"{path}: {name} qscale shape {s.shape} does not match qvalues {q.shape}")
            if not (np.all(np.isfinite(s)) and np.all(s > 0)):
                raise ValueError(f"{path}: {name} has non-positive or non-finite scales (corrupt int8 tensor)")
        elif not np.all(np.isfinite(np.asarray(x, np.float32))):
            raise ValueError(f"{path}: {name} contains NaN or Inf")
    _map(tree, check)


def _set_path(tree, path, value):
    if not path:
        return value
    return dict(tree, **{path[0]: _set_path(tree[path[0]], path[1:], value)})


def _get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def sensitivity(params, error_fn) -> Dict[Tuple[str, ...], float]:
    """Error of `error_fn(params')` when only one kernel at a time is int8-quantized (fp32 elsewhere)."""
    out = {}
    for path in kernel_paths(params):
        w = _get_path(params, path)
        deq = dequantize_leaf({k: jnp.asarray(v) for k, v in quantize_int8(w).items()})
        out[path] = float(error_fn(_set_path(params, path, deq)))
    return out


def choose_fp16_kernels(sens: Dict[Tuple[str, ...], float], share: float = 0.5) -> List[Tuple[str, ...]]:
    """The most sensitive kernels whose errors add up to `share` of the total: kept in fp16 in 'mixed'."""
    ranked = sorted(sens.items(), key=lambda kv: -kv[1])
    total, acc, keep = sum(sens.values()) or 1.0, 0.0, []
    for path, e in ranked:
        if acc >= share * total:
            break
        keep.append(path)
        acc += e
    return keep
