"""How a command group gathers its subcommands: each listed module exposes `register(subparsers)`.

Used by `kiln` (kiln/cli.py) and `kiln data` (data_pipeline/cli.py), so "which modules add commands" is a list
in each and "how they are loaded" is written once, here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def register_modules(subparsers, module_names: Iterable[str]) -> list[str]:
    """Call `register(subparsers)` of every module that is installed; returns the names registered.

    A module that is absent (an optional stage not shipped) is skipped; a module that is present but fails to
    import because one of *its* imports is missing raises, so a broken install is not silently hidden.
    """
    registered = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(subparsers)
        registered.append(name)
    return registered
