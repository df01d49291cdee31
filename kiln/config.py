"""Typed recipe configs: YAML -> dataclasses, shared by every stage (data, pretrain, sft).

Why our own loader instead of OmegaConf/Hydra: recipes must fail *before* any process group starts, with a
message that names the file and the key path, and an unknown key must come with a "did you mean" suggestion.
A small strict loader over standard dataclasses gives exactly that with no extra dependency.

Usage::

    @dataclass
    class Optim:
        lr: float = 3e-4

    @dataclass
    class Recipe:
        name: str
        optim: Optim = field(default_factory=Optim)

    recipe = load_config(Recipe, "recipe.yaml", ["optim.lr=1e-3"])

Validation hooks: a dataclass may define ``validate(self) -> None`` that raises a plain ``ValueError`` about its
own fields (no file or key prefix, no ``ConfigError``). Once the whole tree is built, the loader runs every hook
exactly once, children before parents (``validate_tree``), and prefixes the message with the file and key path:
``tiny.yaml: key 'parallel': tp must be >= 1, got 0``. A parent's ``validate`` therefore checks only what spans
its children and never calls theirs; code that builds configs in Python calls ``validate_tree(cfg)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe problem, phrased for the person who wrote the recipe."""


def _where(source: str | None, path: str) -> str:
    where = f"{source}: " if source else ""
    return f"{where}key '{path}'" if path else f"{where}top level"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(choices))}."


def _convert(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Coerce a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        tagged = _tagged_union_member(args, value, path, source)
        if tagged is not None:
            return _build(tagged, value, path, source)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{_where(source, path)}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            sugg = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" Did you mean '{sugg[0]}'?" if sugg else ""
            raise ConfigError(f"{_where(source, path)}: expected one of {list(allowed)}, got {value!r}.{hint}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, path)}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, path, source)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, path)}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(source, path)}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, path)}: expected a mapping, got {value!r}")
        args = get_args(tp)
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, f"{path}.{k}", source): _convert(v, val_tp, f"{path}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(source, path)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{_where(source, path)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_where(source, path)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{_where(source, path)}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{_where(source, path)}: expected a path, got {value!r}")
    return value


def _kind_of(cls: Any) -> tuple[str, ...]:
    """The ``kind`` tags of a dataclass in a tagged union: its ``kind: Literal[...]`` field."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        return ()
    hint = get_type_hints(cls).get("kind")
    return tuple(get_args(hint)) if get_origin(hint) is Literal else ()


def _tagged_union_member(args: tuple, value: Any, path: str, source: str | None) -> type | None:
    """Union of dataclasses tagged by ``kind: Literal[...]``: pick the member from the mapping's ``kind``."""
    members = {k: a for a in args for k in _kind_of(a)}
    if not members or not isinstance(value, Mapping):
        return None
    kind = value.get("kind")
    if kind not in members:
        sub = f"{path}.kind" if path else "kind"
        got = "missing" if kind is None else repr(kind)
        raise ConfigError(
            f"{_where(source, sub)}: {got}, expected one of {sorted(members)}.{_suggest_value(kind, members)}"
        )
    return members[kind]


def _suggest_value(value: Any, choices: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def build_dataclass(cls: type[T], data: Mapping[str, Any], path: str = "", source: str | None = None) -> T:
    """Build ``cls`` from a mapping (unknown or missing keys are errors naming the key path), then validate it."""
    obj = _build(cls, data, path, source)
    validate_tree(obj, path, source)
    return obj


def _build(cls: type[T], data: Mapping[str, Any], path: str, source: str | None) -> T:
    # Builds the tree without validating: validate_tree runs once over the finished tree, so a parent's hook
    # never sees (or re-checks) a half-built child and defaults that are not in the YAML are checked too.
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{_where(source, sub)}: unknown key for {cls.__name__}.{_suggest(str(key), fields)}")
        kwargs[key] = _convert(value, hints[key], sub, source)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        subs = ", ".join(f"{path}.{m}" if path else m for m in missing)
        raise ConfigError(f"{source + ': ' if source else ''}missing required key(s): {subs}")
    return cls(**kwargs)


def validate_tree(obj: Any, path: str = "", source: str | None = None) -> None:
    """Run each ``validate()`` hook in a config tree once, children before parents, raising ``ConfigError`` that
    names the file (``source``) and key path. Walks dataclass fields, lists, tuples and dict values."""
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            validate_tree(item, f"{path}[{i}]", source)
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            validate_tree(item, f"{path}.{key}" if path else str(key), source)
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        validate_tree(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name, source)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            # A config built in Python (no file, no key) is named by its class instead of "top level".
            where = _where(source, path) if source or path else type(obj).__name__
            raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value); values are parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. executor.tasks=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a raw mapping; list items are addressed by index (steps.0.x=1)."""
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, key, text)]
            else:
                if not isinstance(node.get(key, {}), (dict, list)):
                    raise ConfigError(f"override {text!r}: '{'.'.join(keys[: i + 1])}' is not a mapping")
                node = node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, text)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, key: str, text: str) -> int:
    try:
        idx = int(key)
    except ValueError:
        raise ConfigError(f"override {text!r}: '{key}' indexes a list, expected an integer") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"override {text!r}: index {idx} out of range (list has {len(node)} items)")
    return idx


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML (optional), apply ``key=value`` overrides, build and validate ``cls``."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return build_dataclass(cls, data, source=str(path) if path is not None else "overrides")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able structure (paths as strings), for saving the resolved recipe with a run."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


__all__ = [
    "ConfigError",
    "apply_overrides",
    "build_dataclass",
    "load_config",
    "parse_override",
    "read_yaml",
    "to_dict",
    "validate_tree",
]
