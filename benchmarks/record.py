"""Appending a run's result to its file in benchmarks/results/: the file's title and source line on first write."""

from __future__ import annotations

from pathlib import Path


def append_result(path: Path, title: str, script: str, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write(f"# {title}\n\n")
            f.write(f"Recorded by `{script}` (see its docstring for what each side runs).\n\n")
        f.write(text + "\n")
