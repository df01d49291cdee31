"""`kiln data inspect`: look at samples of any stage's output.

Accepts a run directory (prints what is in it), a folder of `.jsonl(.gz)` shards (output/, excluded/<step>/,
rejects/input<i>/, work/filtered/), a single shard, or a tokenized dataset prefix (`<prefix>.idx` exists),
which is decoded back to text with the loss mask shown.
"""

from __future__ import annotations

import gzip
import random
import textwrap
from collections.abc import Iterator
from pathlib import Path

import orjson

RUN_FOLDERS = ("output", "excluded", "rejects", "work/filtered")


def _records(path: Path) -> Iterator[tuple[Path, int, dict]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.jsonl*") if p.is_file())
    for file in files:
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield file, line_no, orjson.loads(line)


def count_records(path: Path) -> int:
    return sum(1 for _ in _records(path))


def describe_run(run_dir: Path) -> str:
    lines = [f"run directory {run_dir}:"]
    for name in RUN_FOLDERS:
        folder = run_dir / name
        if not folder.is_dir():
            continue
        subs = sorted(p for p in folder.iterdir() if p.is_dir()) or [folder]
        for sub in subs:
            lines.append(f"  {sub.relative_to(run_dir)}/  {count_records(sub):,} records")
    lines.append("inspect one with: kiln data inspect <run>/<folder> [-n 5] [--reason R] [--grep TEXT]")
    return "\n".join(lines)


def _reason(record: dict) -> str | None:
    meta = record.get("metadata") or {}
    return record.get("reason") or meta.get("filter_reason") or meta.get("dedup_reason")


def format_record(file: Path, line_no: int, record: dict, width: int, max_chars: int) -> str:
    meta = record.get("metadata") or {}
    head = [f"--- {file.name}:{line_no}"]
    for key, value in (
        ("id", record.get("id")),
        ("url", meta.get("url") or record.get("url")),
        ("reason", _reason(record)),
        ("message", record.get("message")),
        ("source", record.get("file") or meta.get("source_file")),
    ):
        if value not in (None, ""):
            head.append(f"{key}: {value}")
    text = record.get("text", record.get("raw", ""))
    if not isinstance(text, str):
        text = str(text)
    body = text[:max_chars] + (f" [... {len(text) - max_chars:,} more chars]" if len(text) > max_chars else "")
    wrapped = "\n".join(textwrap.fill(p, width) if p.strip() else "" for p in body.split("\n"))
    return "\n".join(head) + "\n" + textwrap.indent(wrapped, "  ")


def inspect_path(
    path: Path,
    n: int = 5,
    reason: str | None = None,
    grep: str | None = None,
    sample: bool = False,
    seed: int = 0,
    width: int = 100,
    max_chars: int = 800,
) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "logs").is_dir() and not any(path.glob("*.jsonl*")):
        return describe_run(path)
    matches = (
        (f, ln, r)
        for f, ln, r in _records(path)
        if (reason is None or _reason(r) == reason) and (grep is None or grep in r.get("text", r.get("raw", "")))
    )
    if sample:  # reservoir sampling: a uniform sample without holding the folder in memory
        rng = random.Random(seed)
        chosen: list = []
        for i, item in enumerate(matches):
            if len(chosen) < n:
                chosen.append(item)
            elif (j := rng.randint(0, i)) < n:
                chosen[j] = item
    else:
        chosen = [item for _, item in zip(range(n), matches)]
    if not chosen:
        return f"{path}: no matching records"
    return "\n".join(format_record(f, ln, r, width, max_chars) for f, ln, r in chosen)
