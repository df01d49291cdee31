"""Reference tables of a recipe's fields, read from the config dataclasses themselves.

A field's meaning is the comment written beside it (``tp: int = 1  # ...``) or in the comment block right above
it, an attribute docstring under it, or a ``name: meaning`` entry of its class docstring; a section's introduction
is the rest of the class docstring. Types and defaults come from the annotations and the dataclass defaults. So
``kiln docs`` (``kiln.docs_pages``) cannot drift from the code, and a field added without a comment fails the
generation with its file and line (``UndocumentedField``).

No torch or datatrove here: the classes are handed in by the caller.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# "# --- ours ---": a heading over a group of fields, not the meaning of the next one
_HEADING = re.compile(r"^-{2,}.*-{2,}$")
_PRAGMA = re.compile(r"^(fmt:|noqa|type:|pragma)")
# "name: meaning" (or "a / b: meaning") at the start of a docstring line, continued by indented lines: the
# Google-style attribute list some config classes keep in their docstring instead of per-field comments
_DOC_ENTRY = re.compile(r"^(?P<names>\w+(?:\s*/\s*\w+)*):\s+(?P<text>\S.*)$")


class UndocumentedField(ValueError):
    """A config field with neither a comment nor an attribute docstring."""


@dataclass(frozen=True)
class FieldRow:
    key: str  # as a recipe spells it: parallel.tp, data.datasets[].prefix
    type: str
    default: str
    meaning: str


@dataclass(frozen=True)
class Section:
    key: str  # "" for the top level
    cls: type
    tag: str | None  # the `kind: ...` value selecting this class in a tagged union
    intro: str
    rows: tuple[FieldRow, ...]


def class_doc(cls: type) -> str:
    """The class's own docstring (a dataclass without one gets a generated signature as ``__doc__``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return inspect.cleandoc(ast.get_docstring(tree.body[0], clean=False) or "")


def class_intro(cls: type) -> str:
    """The class docstring less its ``name: meaning`` entries, which the field table shows."""
    kept: list[str] = []
    in_entry = False
    for line in class_doc(cls).splitlines():
        if _DOC_ENTRY.match(line):
            in_entry = True
            continue
        if in_entry and line.startswith((" ", "\t")) and line.strip():
            continue
        in_entry = False
        kept.append(line)
    return "\n".join(kept).strip()


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its explanation in ``cls``'s own body (inherited fields are found in their class)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        parts = [c for c in above if c and not _HEADING.match(c) and not _PRAGMA.match(c)]
        trailing = comments.get(node.end_lineno or node.lineno)
        if trailing and not _PRAGMA.match(trailing) and not lines[node.end_lineno - 1].strip().startswith("#"):
            parts.append(trailing)
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
            if isinstance(after.value.value, str):
                parts.append(inspect.cleandoc(after.value.value))
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


def docstring_entries(doc: str) -> dict[str, str]:
    """Field name -> meaning from a class docstring's ``name: meaning`` lines."""
    out: dict[str, str] = {}
    current: list[str] = []
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        m = _DOC_ENTRY.match(line)
        if m:
            current = [m["text"].strip()]
            for j in range(i + 1, len(lines)):
                if not lines[j].startswith((" ", "\t")) or not lines[j].strip():
                    break
                current.append(lines[j].strip())
            for name in re.split(r"\s*/\s*", m["names"]):
                out[name] = " ".join(current)
    return out


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    m = re.match(r"(.+?\.)(?=\s+[A-Z`(]|$)", flat)  # a period before a capital: not "e.g. a"
    return m.group(1) if m else flat


def _source_line(cls: type, name: str) -> str:
    try:
        lines, start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return cls.__qualname__
    for offset, text in enumerate(lines):
        if re.match(rf"\s+{re.escape(name)}\s*:", text):
            return f"{Path(inspect.getsourcefile(cls) or '?').name}:{start + offset}"
    return cls.__qualname__


def _meanings(cls: type) -> dict[str, str]:
    found: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        found.update(docstring_entries(class_doc(klass)))
        found.update(field_comments(klass))
    tags = _kind_tags(cls)
    if "kind" not in found and len(tags) == 1:  # the tag of a tagged-union member: what selects this class
        found["kind"] = f"`{tags[0]}` selects this section"
    return found


def type_name(tp: Any) -> str:
    """An annotation as a recipe author reads it: ``int | null``, ``"cosine" | "wsd"``, ``list[DatasetSpec]``."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if isinstance(tp, type):
        return "path" if tp is Path else tp.__name__
    return str(tp).replace("typing.", "")


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):  # quoted (with \n escapes) where the bare text would hide whitespace
        return json.dumps(value) if value == "" or value.strip() != value or "\n" in value else value
    return repr(value) if isinstance(value, float) else str(value)


REQUIRED = "required"
SECTION_DEFAULTS = "its own defaults"
NOT_VALUES = (REQUIRED, SECTION_DEFAULTS)  # default texts that are words, not YAML values


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return SECTION_DEFAULTS
        return _yaml_value(value)
    return REQUIRED


def _kind_tags(cls: type) -> tuple[str, ...]:
    hint = get_type_hints(cls).get("kind") if dataclasses.is_dataclass(cls) else None
    return tuple(get_args(hint)) if get_origin(hint) is Literal else ()


def _nested(tp: Any, key: str) -> list[tuple[str, type]]:
    """(key prefix, dataclass) for each config class inside an annotation; ``[]`` marks list items, ``<name>``
    dict values."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return [(key, tp)]
    if origin in (Union, types.UnionType):
        return [item for a in args for item in _nested(a, key)]
    if origin in (list, tuple):
        return [item for a in args if a is not Ellipsis for item in _nested(a, f"{key}[]")]
    if origin is dict and len(args) == 2:
        return _nested(args[1], f"{key}.<name>")
    return []


def sections(
    cls: type,
    key: str = "",
    *,
    skip: frozenset[str] = frozenset(),
    rename: dict[str, str] | None = None,
    required: frozenset[str] = frozenset(),
) -> list[Section]:
    """``cls``'s table and, depth first, one per config class its fields hold. ``skip``, ``rename`` and
    ``required`` apply to the top level only: the SFT page shows ``TrainRecipe.sft`` (optional in the class, as a
    pretraining recipe has none) as the required ``data`` its recipe file spells."""
    rename = rename or {}
    hints = get_type_hints(cls)
    meanings = _meanings(cls)
    rows: list[FieldRow] = []
    children: list[Section] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        name = rename.get(f.name, f.name)
        full = f"{key}.{name}" if key else name
        nested = _nested(hints[f.name], full)
        meaning = meanings.get(f.name, "")
        if not meaning and nested:
            first = _first_sentence(class_intro(nested[0][1]))
            meaning = "one of the sections below, chosen by `kind`" if len(nested) > 1 else first or "the section below"
        if not meaning:
            raise UndocumentedField(
                f"{cls.__qualname__}.{f.name} ({_source_line(cls, f.name)}) has no comment: write what it means beside "
                "or above the field, so `kiln docs` can list it"
            )
        shown = type_name(hints[f.name])
        if f.name in required:
            shown = " | ".join(t for t in shown.split(" | ") if t != "null")
        rows.append(FieldRow(full, shown, REQUIRED if f.name in required else default_text(f), meaning))
        tagged = len(nested) > 1
        for sub_key, sub_cls in nested:
            tags = _kind_tags(sub_cls) if tagged else ()
            for sub in sections(sub_cls, sub_key):
                children.append(dataclasses.replace(sub, tag=tags[0] if tags and sub.cls is sub_cls else sub.tag))
    return [Section(key, cls, None, class_intro(cls), tuple(rows)), *children]


__all__ = [
    "NOT_VALUES",
    "FieldRow",
    "Section",
    "UndocumentedField",
    "class_doc",
    "class_intro",
    "field_comments",
    "sections",
]
