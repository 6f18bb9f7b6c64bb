"""Convert the official TD-MPC2 offline datasets (`chunk_*.pt`, reference doc §5.3) to our format.

A chunk holds obs (N, T, O), action (N, T, A), reward (N, T) and task (N, T) for N episodes of T
steps (entry 0 of action/reward is filler). Both plain dict-of-tensor files and TensorDict pickles
(`tensordict._reductions._make_td`, the current tensordict format) are read by our restricted
unpickler without torch. Other TensorDict layouts (older tensordict releases) fall back to the
optional torch + tensordict extra (`pip install torch tensordict`), loaded with `weights_only=True`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.checkpoints.torch_reader import read_torch_file
from tdmpc_jax.data.dataset import DatasetError, DatasetWriter

FIELDS = ("obs", "action", "reward", "task")


def read_chunk(path) -> dict:
    try:
        obj = read_torch_file(path)
    except CheckpointError as e:
        if "tensordict" not in str(e):
            raise
        obj = _read_tensordict(path)
    if not isinstance(obj, dict) or any(f not in obj for f in FIELDS):
        raise DatasetError(path, f"not a TD-MPC2 dataset chunk (needs fields {', '.join(FIELDS)})")
    out = {f: np.asarray(obj[f]) for f in FIELDS}
    n, t = out["reward"].shape[:2] if out["reward"].ndim >= 2 else (None, None)
    if n is None or out["obs"].shape[:2] != (n, t) or out["action"].shape[:2] != (n, t) or \
            out["task"].shape[:2] != (n, t):
        raise DatasetError(path, "fields disagree on (episodes, steps): " +
                           ", ".join(f"{f} {out[f].shape}" for f in FIELDS))
    return out


def _read_tensordict(path):
    try:
        import tensordict
        import torch
    except ImportError:
        raise DatasetError(path, "is a TensorDict pickle: install the importer extra "
                                 "(`pip install torch tensordict`) to read it") from None
    safe = [getattr(tensordict, n) for n in ("TensorDict",) if hasattr(tensordict, n)]
    torch.serialization.add_safe_globals(safe)
    try:
        td = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DatasetError(path, f"cannot read TensorDict safely: {str(e)[:200]}") from None
    return {f: td[f].float().numpy() if f != "task" else td[f].numpy() for f in FIELDS}


def import_chunks(paths: Sequence[str], out_path, tasks: Sequence[str], task_set=None, progress=True,
                  overwrite=False):
    """Write every episode of every chunk into one dataset (obs padded / actions as stored).

    out_path must be new, an empty directory or a dataset (replaced at the end), unless `overwrite`."""
    if not paths:
        raise ValueError("no chunk files given")
    from tdmpc_jax.results_io import check_output
    check_output(out_path, "dataset", overwrite)
    writer = None
    try:
        for i, p in enumerate(paths):
            c = read_chunk(p)
            if writer is None:
                writer = DatasetWriter(out_path, c["obs"].shape[-1], c["action"].shape[-1], tasks, task_set,
                                       overwrite=overwrite)
            elif (c["obs"].shape[-1], c["action"].shape[-1]) != (writer.obs_dim, writer.action_dim):
                raise DatasetError(p, "obs/action dims differ from the first chunk")
            for e in range(c["obs"].shape[0]):
                task = c["task"][e]
                if np.any(task != task[0]):
                    raise DatasetError(p, f"episode {e} changes task mid-episode")
                writer.add_episode(c["obs"][e], c["action"][e], c["reward"][e], int(task[0]))
            if progress:
                print(f"  {os.path.basename(p)}: {c['obs'].shape[0]} episodes ({i + 1}/{len(paths)})", flush=True)
        return writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
