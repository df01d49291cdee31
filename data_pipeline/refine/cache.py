"""On-disk rewrite cache: one small JSON file per (model, prompt, text), written atomically, so a re-run never
pays for the same rewrite twice. Only successful backend answers are stored (a failure is retried next run).
Stored per entry: the model id, the raw answer and whether it was cut at the token limit; never credentials."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_key(model_id: str, prompt: str, text: str) -> str:
    """sha256 over model, prompt and text (NUL-separated so that field boundaries cannot collide)."""
    return hashlib.sha256("\0".join((model_id, prompt, text)).encode("utf-8")).hexdigest()


class RewriteCache:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[str, bool] | None:
        """(answer, truncated) or None on a miss; an unreadable entry counts as a miss and is rewritten later."""
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
            return str(entry["output"]), bool(entry.get("truncated", False))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, model_id: str, output: str, truncated: bool = False) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"model": model_id, "output": output, "truncated": truncated}, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
            os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*/*.json"))
