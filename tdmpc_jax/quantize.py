"""Post-training quantization of world-model params: a registry of storage formats.

Built-in formats (what is saved):
  fp32 / fp16 / bf16: every leaf cast.
  int8: every matmul kernel as {'qvalues': int8 (..., in, out), 'qscale': f32 (..., out)}, symmetric per
        output channel (per Q-ensemble member); biases, LayerNorm and task embeddings stay fp32.
  mixed: int8 kernels except those that measurement shows matter most (kept fp16); the rest fp16.
Compute modes (how a loaded agent runs): 'fp32' dequantizes once at load; 'bf16' keeps bf16 kernels
and runs the matmuls in bf16 with fp32 accumulation (see networks.matmul).

Adding a format: write one `Format` (name, flag help, nominal bytes per kernel weight, `encode` one
fp32 leaf, and for a new stored layout `decode` / `is_stored` / `validate`) and pass it to
`register_format`, here next to the built-ins (then every entry point knows it) or from your own code
/ test (known to the processes that import it, for as long as it is registered). Everything else derives
from `FORMATS`: `convert`/`dequantize`, `Agent.save` and `load_checkpoint` (checkpoints record the
name as metadata 'param_format' and are read back with that format), the checks on load,
experiments/quantize.py (its --formats choices, default and help) and the report (`quant_report`).
A stored leaf is an array or a dict of arrays (Orbax saves any such tree); `decode` must be
jax-traceable (checkpoint loading runs it under `jax.eval_shape`). `registered(...)` scopes
registrations (tests). Checkpoints of a format that is not registered fail to load with a
CheckpointError naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import ml_dtypes
import numpy as np

from tdmpc_jax.lazy_import import lazy

jax, jnp = lazy("jax"), lazy("jax.numpy")  # imported when a conversion runs: entry points read FORMATS (their
# --formats flag) without importing JAX (tdmpc_jax.lazy_import)

Path = Tuple[str, ...]


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
    """A stored leaf of the built-in formats (float array or int8 dict) -> fp32."""
    if is_quantized(x):
        return x["qvalues"].astype(jnp.float32) * x["qscale"][..., None, :]
    return x.astype(jnp.float32)


def _validate_builtin(name: str, x):
    if is_quantized(x):
        q, s = np.asarray(x["qvalues"]), np.asarray(x["qscale"])
        if q.dtype != np.int8:
            raise ValueError(f"{name} qvalues have dtype {q.dtype}, expected int8")
        if s.shape != q.shape[:-2] + q.shape[-1:]:
            raise ValueError(f"{name} qscale shape {s.shape} does not match qvalues {q.shape}")
        if not (np.all(np.isfinite(s)) and np.all(s > 0)):
            raise ValueError(f"{name} has non-positive or non-finite scales (corrupt int8 tensor)")
    elif not np.all(np.isfinite(np.asarray(x, np.float32))):
        raise ValueError(f"{name} contains NaN or Inf")


def _no_metadata(sensitive: Sequence[Path]) -> dict:
    return {}


def is_kernel(path: Path, x) -> bool:
    """A matmul kernel (what int8-style formats quantize): a leaf named 'kernel' with >= 2 dims."""
    return bool(path) and path[-1] == "kernel" and np.ndim(x) >= 2


@dataclasses.dataclass(frozen=True)
class Format:
    """One storage format. Only name, help, bytes_per_param and encode are needed for a format whose
    stored leaves are plain float arrays or int8 dicts (the built-in layouts); a new layout also gives
    decode, is_stored and validate.

    encode(path, w, sensitive) -> stored leaf: `w` one fp32 numpy leaf at `path` (('encoder', 'layer_0',
        'dense', 'kernel'), ...); `sensitive`: the kernel is among those measurement shows matter most
        (see `uses_sensitivity`). Returns an array or a dict of arrays.
    decode(stored leaf of jnp arrays) -> fp32 jnp array of the original shape; jax-traceable. It gets
        every leaf, also the plain arrays encode left alone (`dequantize_leaf` decodes those).
    is_stored(node) -> whether a dict node of a stored tree is one stored leaf (not a subtree).
    validate(name, stored leaf): raise ValueError('<name> ...') on a corrupt leaf (run on load).
    bytes_per_param: nominal bytes of one kernel weight (help text, the report).
    uses_sensitivity: encode uses `sensitive`; experiments/quantize.py measures per-kernel int8
        sensitivity (quant_report.choose_mixed) only when a format that does is asked for.
    metadata(sensitive kernels) -> extra checkpoint metadata written by Agent.save.
    """

    name: str
    help: str
    bytes_per_param: float
    encode: Callable[[Path, np.ndarray, bool], Any]
    decode: Callable[[Any], Any] = dequantize_leaf
    is_stored: Callable[[Any], bool] = is_quantized
    validate: Callable[[str, Any], None] = _validate_builtin
    uses_sensitivity: bool = False
    metadata: Callable[[Sequence[Path]], dict] = _no_metadata

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str) or "," in self.name or "/" in self.name:
            raise ValueError(f"format name must be a non-empty string without ',' or '/', got {self.name!r}")


_REGISTRY: Dict[str, Format] = {}
FORMATS: Mapping[str, Format] = types.MappingProxyType(_REGISTRY)  # name -> Format, read-only live view


def register_format(fmt: Format, replace: bool = False) -> Format:
    """Make `fmt` known to convert / save / load / the CLI. A second format of one name needs replace."""
    if not isinstance(fmt, Format):
        raise TypeError(f"register_format takes a quantize.Format, got {type(fmt).__name__}")
    if fmt.name in _REGISTRY and not replace and _REGISTRY[fmt.name] is not fmt:
        raise ValueError(f"format {fmt.name!r} is already registered (pass replace=True)")
    _REGISTRY[fmt.name] = fmt
    return fmt


@contextlib.contextmanager
def registered(*formats: Format, replace: bool = False):
    """Register `formats` for the duration of a with-block; the registry is restored on exit."""
    saved = dict(_REGISTRY)
    try:
        for f in formats:
            register_format(f, replace)
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def get_format(name: str) -> Format:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def _cast(dtype):
    return lambda path, w, sensitive: w.astype(dtype)


def _int8(path, w, sensitive):
    return quantize_int8(w) if is_kernel(path, w) else w


def _mixed(path, w, sensitive):
    return quantize_int8(w) if is_kernel(path, w) and not sensitive else w.astype(np.float16)


register_format(Format("fp32", "float32, as trained", 4.0, _cast(np.float32)))
register_format(Format("fp16", "every leaf float16", 2.0, _cast(np.float16)))
register_format(Format("bf16", "every leaf bfloat16", 2.0, _cast(ml_dtypes.bfloat16)))  # jnp.bfloat16's dtype
register_format(Format("int8", "int8 kernels, one fp32 scale per output channel; the rest fp32", 1.0, _int8))
register_format(Format("mixed", "int8 kernels except the most sensitive (fp16); the rest fp16", 1.0, _mixed,
                       uses_sensitivity=True,
                       metadata=lambda keep: {"mixed_fp16_kernels": ["/".join(p) for p in keep]}))


def _map(tree, fn, path=(), is_stored=is_quantized):
    """Map fn(path, leaf) over a params tree, treating stored dict leaves (`is_stored`) as leaves."""
    if is_stored(tree) or not isinstance(tree, dict):
        return fn(path, tree)
    return {k: _map(v, fn, path + (k,), is_stored) for k, v in tree.items()}


def kernel_paths(params) -> List[Tuple[str, ...]]:
    out = []
    _map(params, lambda p, x: out.append(p) if p and p[-1] == "kernel" else None)
    return out


def convert(params, fmt: str, keep_fp16: Iterable[Tuple[str, ...]] = ()):
    """fp32 params -> storage tree in `fmt`. `keep_fp16`: the sensitive kernels (mixed keeps them fp16)."""
    f = get_format(fmt)
    keep = {tuple(k) for k in keep_fp16}
    return _map(params, lambda path, x: f.encode(path, np.asarray(x, np.float32), path in keep))


def dequantize(tree, fmt: str = "fp32"):
    """Storage tree in `fmt` -> fp32 params. The built-in formats share one decoder: the default
    reads any of them; other formats need their name."""
    f = get_format(fmt)
    return _map(tree, lambda p, x: f.decode(jax.tree_util.tree_map(jnp.asarray, x)), is_stored=f.is_stored)


def for_compute(tree, mode: str = "fp32", fmt: str = "fp32"):
    """Params to run with: 'fp32' (dequantize once) or 'bf16' (bf16 kernels, bf16 matmuls)."""
    params = dequantize(tree, fmt)
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


def validate_storage(tree, path="<params>", fmt: str = "fp32"):
    """Raise ValueError on a corrupt storage tree in `fmt` (int8: bad dtypes, non-positive or non-finite
    scales; any format: NaN or Inf in float leaves)."""
    f = get_format(fmt)

    def check(p, x):
        try:
            f.validate("/".join(p), x)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    _map(tree, check, is_stored=f.is_stored)


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
    """The most sensitive kernels whose errors add up to `share` of the total: kept in fp16 in 'mixed'
    (passed as `sensitive` to the encode of every format with uses_sensitivity)."""
    ranked = sorted(sens.items(), key=lambda kv: -kv[1])
    total, acc, keep = sum(sens.values()) or 1.0, 0.0, []
    for path, e in ranked:
        if acc >= share * total:
            break
        keep.append(path)
        acc += e
    return keep
