"""JAX's persistent compilation cache for the experiment entry points (`cli.run` turns it on).

Compiled XLA executables are kept under $TDMPC_JAX_CACHE_DIR, else $XDG_CACHE_HOME/tdmpc_jax/xla,
else ~/.cache/tdmpc_jax/xla, so a second run of the same update/planner skips the compile (tens of
seconds for the update on this CPU). TDMPC_JAX_NO_CACHE=1 turns it off. JAX keys the entries by
the computation, the jax/jaxlib versions, the backend and the XLA flags, so a stale entry is never
reused; deleting the directory is always safe. JAX's key says only "cpu" for the CPU backend, not which
CPU, so the entries live in a subdirectory per host CPU (model and instruction-set flags): a home
directory shared by machines with different CPUs never loads code compiled for another one.
"""
from __future__ import annotations

import hashlib
import os
import platform
from typing import Optional


def cache_dir() -> str:
    if os.environ.get("TDMPC_JAX_CACHE_DIR"):
        return os.environ["TDMPC_JAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tdmpc_jax", "xla")


def host_tag() -> str:
    """<machine>-<hash of the CPU model and feature flags>: which compiled CPU code this host can run."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            ident += "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        pass
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def enable(path: Optional[str] = None) -> Optional[str]:
    """Point JAX's persistent compilation cache at `path` (default `cache_dir()/host_tag()`); call before the
    first compile. Returns the directory, or None when TDMPC_JAX_NO_CACHE is set or the directory
    cannot be created (then JAX compiles as usual)."""
    if os.environ.get("TDMPC_JAX_NO_CACHE", "").strip() not in ("", "0"):
        return None
    path = path or os.path.join(cache_dir(), host_tag())
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    return path
