"""`lazy(name)`: a stand-in for a module that imports it on first attribute access.

The registries that entry points read while they define their flags (`distill_terms`: the distillation
flags; `quantize.FORMATS`: --formats) live next to functions that need JAX only when they run. Their
modules name `jax` / `jax.numpy` through this stand-in, so an entry point defines and checks its flags,
and refuses a bad one, without importing JAX (~1.5 s of a 2-core machine's start; `tdmpc_jax/__init__`
imports its names lazily for the same reason). The first attribute read imports the module for good;
every later read is a dictionary lookup.
"""
from __future__ import annotations

import importlib


class lazy:  # noqa: N801 (stands where a module name stands)
    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)  # after the first: a sys.modules lookup

    def __setattr__(self, attr, value):
        raise AttributeError(f"lazy({self._name!r}) is read-only")

    def __repr__(self):
        return f"lazy({self._name!r})"
