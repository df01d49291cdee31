"""The recipes shipped inside the package (``kiln.recipes``: recipes/ in the checkout), found by name.

A recipe's name is its path under recipes/ without the suffix (``pretrain/tiny``, ``data/demo``); a bare stem
(``tiny``) works when only one recipe has it. Read through importlib.resources, so the same names work from a
wheel installed anywhere and from an editable checkout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kiln.config import ConfigError

SUFFIXES = (".yaml", ".yml", ".sh", ".jinja")


@dataclass(frozen=True)
class RecipeEntry:
    name: str  # e.g. "pretrain/tiny"
    path: Path
    summary: str  # the first comment line of the file

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[0]


def recipes_root() -> Path:
    # kiln.recipes is a plain package on disk in both the wheel and the editable install (no zip imports)
    return Path(str(resources.files("kiln.recipes")))


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#!"):
            continue
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            break
    return ""


def list_recipes() -> list[RecipeEntry]:
    root = recipes_root()
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
            name = path.relative_to(root).with_suffix("").as_posix()
            entries.append(RecipeEntry(name, path, _summary(path)))
    return entries


def find_recipe(name: str) -> RecipeEntry:
    """The shipped recipe called ``name`` (``pretrain/tiny``, ``tiny``, ``pretrain/tiny.yaml``); a ConfigError
    listing the known names otherwise."""
    entries = list_recipes()
    key = name.strip().removeprefix("recipes/")
    stem = os.path.splitext(key)[0] if key.endswith(SUFFIXES) else key
    exact = [e for e in entries if e.name == stem]
    by_stem = [e for e in entries if e.name.rsplit("/", 1)[-1] == stem]
    found = exact or by_stem
    if len(found) == 1:
        return found[0]
    known = ", ".join(e.name for e in entries)
    if len(found) > 1:
        raise ConfigError(f"recipe '{name}' is ambiguous: {', '.join(e.name for e in found)}; give the full name")
    raise ConfigError(f"unknown recipe '{name}'. Known recipes: {known}")


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe argument as the commands take it: an existing file, else a shipped recipe's name. Only short
    relative forms are looked up by name (``tiny``, ``pretrain/tiny``, ``recipes/pretrain/tiny.yaml``, the last so
    the README's commands work outside the checkout): a missing ``/data/tiny.yaml`` is an error, never silently
    the shipped ``tiny``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    short = name_or_path.removeprefix("recipes/")
    if path.is_absolute() or name_or_path.startswith(".") or len(Path(short).parts) > 2:
        raise ConfigError(f"{path}: recipe file not found")
    try:
        return find_recipe(name_or_path).path
    except ConfigError as e:
        raise ConfigError(f"{name_or_path}: no such file, and {e}") from None
