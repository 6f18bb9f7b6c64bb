"""Orbax checkpoints of our own: params + target Qs + config metadata, loadable with nothing else.

Params may be stored in any format registered in `tdmpc_jax.quantize.FORMATS`: metadata 'param_format'
names it, and loading checks and decodes the stored trees with that format (nothing here is per format;
a new format is added in quantize only).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.config import ModelConfig

FORMAT_NAME = "tdmpc_jax"
FORMAT_VERSION = 1
CHECKSUM_KEY = "array_sha256"  # metadata: {"params/encoder/...": SHA-256 hex of the array's bytes}


def _checkpointer():
    """Uncompressed arrays: sizes on disk then reflect the storage format (fp16 = half of fp32)."""
    import orbax.checkpoint as ocp
    handler = ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler(use_compression=False),
                                             metadata=ocp.JsonCheckpointHandler())
    return ocp, ocp.Checkpointer(handler)


def save_orbax(directory, params, target_qs, cfg: ModelConfig, extra_metadata=None, param_format="fp32"):
    """Write atomically: into a temp sibling, then rename. An existing directory is replaced.

    params/target_qs may be storage trees of `tdmpc_jax.quantize` (param_format: a name in quantize.FORMATS).
    """
    from tdmpc_jax import quantize
    quantize.get_format(param_format)  # ValueError for an unknown format, before anything is written
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(directory, "output directory is not writable")
    ocp, ckptr = _checkpointer()
    state = {"params": params, "target_qs": target_qs}
    state = jax.tree_util.tree_map(np.asarray, state)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": cfg.to_dict(),
            **(extra_metadata or {}), "param_format": param_format, CHECKSUM_KEY: array_checksums(state)}
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        ckptr.save(os.path.join(tmp, "ckpt"), ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), metadata=ocp.args.JsonSave(meta)))
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(directory, os.path.join(old, "x"))
        os.rename(os.path.join(tmp, "ckpt"), directory)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_metadata(directory) -> dict:
    path = os.path.join(directory, "metadata", "metadata")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(directory, "not a tdmpc_jax checkpoint (no metadata)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(directory, f"corrupt metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(directory, "not a tdmpc_jax checkpoint (wrong metadata format)")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(directory, f"written by a newer tdmpc_jax (format version {meta['version']})")
    return meta


def load_orbax(directory):
    """-> (storage params, storage target_qs, cfg, metadata), checked against the config's shapes.

    The trees are as saved (see metadata['param_format']); `quantize.dequantize(tree, param_format)` gives
    fp32. A param_format that is not registered in quantize.FORMATS is a CheckpointError.
    """
    from tdmpc_jax import networks, quantize
    directory = os.path.abspath(os.fspath(directory))
    meta = read_metadata(directory)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(directory, f"bad config in metadata: {e}") from None
    ocp, ckptr = _checkpointer()
    try:
        state = ckptr.restore(directory, ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    except Exception as e:  # orbax/tensorstore raise many types; report them as one
        raise CheckpointError(directory, f"cannot restore state: {type(e).__name__}: {str(e)[:200]}") from None
    want = jax.eval_shape(lambda k: networks.init_params(cfg, k), jax.random.PRNGKey(0))
    got = (state.get("params"), state.get("target_qs")) if isinstance(state, dict) else (None, None)
    if got[0] is None or got[1] is None:
        raise CheckpointError(directory, "state lacks params or target_qs")
    fmt = meta.get("param_format", "fp32")
    try:
        quantize.get_format(fmt)
    except ValueError as e:
        raise CheckpointError(directory, f"param_format: {e}; register the format (tdmpc_jax.quantize."
                                         f"register_format) before loading its checkpoints") from None
    try:
        quantize.validate_storage({"params": got[0], "target_qs": got[1]}, "state", fmt)
        deq = tuple(jax.eval_shape(lambda t: quantize.dequantize(t, fmt), t) for t in got)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(directory, f"corrupt {fmt} parameters: {e}") from None
    check_tree(directory, deq, want)
    verify_checksums(directory, state, meta.get(CHECKSUM_KEY))
    return got[0], got[1], cfg, {k: v for k, v in meta.items() if k != CHECKSUM_KEY}


def _leaf_name(path) -> str:
    """'params/encoder/layer_0/dense/kernel' for a key path (dict keys, sequence indices, attributes)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def array_checksums(tree) -> dict:
    """{leaf name: SHA-256 hex of the leaf's array bytes (C order, native dtype)} for every leaf of `tree`."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        out[_leaf_name(path)] = hashlib.sha256(memoryview(a.reshape(-1).view(np.uint8))).hexdigest()
    return out


def verify_checksums(path, tree, checksums) -> bool:
    """CheckpointError naming the first array of `tree` whose bytes differ from the checksum saved with it.

    `checksums` None (a checkpoint written before checksums existed): nothing to verify, returns False.
    """
    if checksums is None:
        return False
    if not isinstance(checksums, dict):
        raise CheckpointError(path, f"corrupt metadata: {CHECKSUM_KEY} is not a mapping")
    got = array_checksums(tree)
    for name, digest in got.items():
        if name not in checksums:
            raise CheckpointError(path, f"array {name} has no checksum in the metadata")
        if digest != checksums[name]:
            raise CheckpointError(path, f"array {name} is corrupt: its SHA-256 {digest[:16]}... differs from "
                                        f"the {str(checksums[name])[:16]}... saved with it")
    missing = sorted(set(checksums) - set(got))
    if missing:
        raise CheckpointError(path, f"array {missing[0]} is missing (the metadata has its checksum)")
    return True


def check_tree(path, got, want):
    """Raise CheckpointError unless `got` has exactly the structure and shapes of `want`."""
    try:
        got_leaves = jax.tree_util.tree_leaves_with_path(got)
        want_leaves = jax.tree_util.tree_leaves_with_path(want)
    except Exception as e:
        raise CheckpointError(path, f"unreadable parameter tree: {e}") from None
    gd = {jax.tree_util.keystr(k): v for k, v in got_leaves}
    wd = {jax.tree_util.keystr(k): v for k, v in want_leaves}
    for k in wd:
        if k not in gd:
            raise CheckpointError(path, f"missing parameter {k}")
        if tuple(gd[k].shape) != tuple(wd[k].shape):
            raise CheckpointError(path, f"parameter {k} has shape {tuple(gd[k].shape)}, expected {tuple(wd[k].shape)}")
    extra = sorted(set(gd) - set(wd))
    if extra:
        raise CheckpointError(path, f"unexpected parameters {extra[:3]}")
