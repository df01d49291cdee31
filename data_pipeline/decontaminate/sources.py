"""Reading evaluation sets: the items of one local file, each with the index the report uses to name it.

Formats, by file name (``.gz`` is read transparently except for Parquet):

- ``.jsonl`` / ``.ndjson``: one JSON object per line; the item's index is its 0-based line number (blank lines are
  not items, so indices may have gaps where the file has blank lines);
- ``.json``: one JSON array of objects; the index is the position in the array;
- ``.parquet``: one row per item; the index is the row number;
- ``.txt`` / ``.text``: one item per non-blank line (line ending removed); the index is the 0-based line number.

Every problem is a ``ValueError`` naming the file (and the line/row and key where there is one), so recipe
loading can report it before any work starts. Imports nothing heavy (pyarrow only for Parquet files).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


def detect_format(path: str | Path) -> str:
    """``jsonl``, ``json``, ``parquet`` or ``text`` from the file name; ValueError for anything else."""
    name = Path(path).name.lower()
    stem = name[: -len(".gz")] if name.endswith(".gz") else name
    suffix = Path(stem).suffix
    fmt = FORMATS.get(suffix)
    if fmt is None or (fmt == "parquet" and stem != name):
        raise ValueError(
            f"eval set {path}: unknown format {Path(path).name!r}; expected one of "
            f"{', '.join(sorted(FORMATS))} (optionally .gz, except .parquet)"
        )
    return fmt


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", newline="")


def _text_of(record, path: Path, where: str, text_key: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"eval set {path}: {where} is not a JSON object (got {type(record).__name__})")
    if text_key not in record:
        keys = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise ValueError(f"eval set {path}: {where} has no text field {text_key!r} (its keys: {keys})")
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(
            f"eval set {path}: {where}: text field {text_key!r} is not a string (got {type(text).__name__})"
        )
    return text


def _iter_jsonl(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"eval set {path}: line {i + 1} is not valid JSON ({e.msg})") from None
            yield i, _text_of(record, path, f"line {i + 1}", text_key)


def _iter_json(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"eval set {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(records, list):
        raise ValueError(f"eval set {path}: a .json eval set must be a JSON array of objects")
    for i, record in enumerate(records):
        yield i, _text_of(record, path, f"item {i}", text_key)


def _parquet_file(path: Path, text_key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"eval set {path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise ValueError(
            f"eval set {path}: has no text field {text_key!r} (its columns: {', '.join(schema.names[:10]) or 'none'})"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"eval set {path}: text field {text_key!r} is not a string column (type {kind})")
    return pf


def _iter_parquet(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    pf = _parquet_file(path, text_key)
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise ValueError(f"eval set {path}: row {row}: text field {text_key!r} is null")
            yield row, text
            row += 1


def _iter_text(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                yield i, line.rstrip("\r\n")


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet, "text": _iter_text}


def iter_items(path: str | Path, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """(index, text) of every item of an eval set (text files ignore ``text_key``)."""
    path = Path(path)
    fmt = detect_format(path)
    try:
        yield from _READERS[fmt](path, text_key)
    except UnicodeDecodeError as e:
        raise ValueError(f"eval set {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # e.g. a truncated or not-really-gzip file
        raise ValueError(f"eval set {path}: cannot be read ({e})") from None


def check_eval_set(path: str, text_key: str = "text") -> None:
    """The cheap checks recipe loading runs: the file exists, its format is known, it has at least one item and the
    first item has the text field. (The other items are checked when the index is built, still before any work.)"""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"eval set {path} does not exist")
    if not p.is_file():
        raise ValueError(f"eval set {path} is not a file (give one file per eval set)")
    fmt = detect_format(p)
    if fmt == "parquet":
        if _parquet_file(p, text_key).metadata.num_rows == 0:
            raise ValueError(f"eval set {path} is empty: no items")
        return
    for _ in iter_items(p, text_key):
        return
    raise ValueError(f"eval set {path} is empty: no items")
