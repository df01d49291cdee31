"""Packages whose public names are imported on first use: importing the package (for its configs, or to register
its commands) must not import datatrove, torch or megatron-core."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, module_of: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``name`` comes from the module ``module_of[name]``."""

    def __getattr__(name: str) -> object:
        if name in module_of:
            return getattr(importlib.import_module(module_of[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
