"""On-disk rewrite cache: one small JSON file per (model, prompt, text), written atomically, so a re-run never
pays for the same rewrite twice. Final failures (after the backend's bounded retries) are stored too, with
their reason, so a re-run replays them instead of paying again; `RefineConfig.retry_failed` retries them.
Stored per entry: the model id, the raw answer (or the error) and whether it was cut at the token limit;
never credentials."""

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

    def get(self, key: str) -> tuple[str | None, bool, str | None] | None:
        """(answer, truncated, error) or None on a miss; a failure entry has answer None and its error. An
        unreadable entry counts as a miss and is rewritten later."""
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
            if entry.get("error") is not None:
                return None, False, str(entry["error"])
            return str(entry["output"]), bool(entry.get("truncated", False)), None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(
        self, key: str, model_id: str, output: str | None, truncated: bool = False, error: str | None = None
    ) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": model_id, "output": output, "truncated": truncated}
        if error is not None:
            record["error"] = error
        payload = json.dumps(record, ensure_ascii=False)
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
