"""The embedded default corpus: real text that every machine with Python has, built at run time.

With no network and no sample data, the demo still needs real, varied prose. Installed Python packages carry
it: each distribution's description (README-like text) and its modules' docstrings. Every document carries
its project's home-page URL, so metadata conditioning later sees real, varied domains (github.com,
pytorch.org, readthedocs.io, ...).

Deterministic for a given environment: distributions and files are visited in sorted order.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
from collections.abc import Iterator
from pathlib import Path

import orjson

# A module docstring is the first statement: skip comments, blank lines and an encoding line, then a string.
_DOCSTRING = re.compile(r"\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*([rRuU]?(\"\"\"|''')(?:.*?)\2)", re.DOTALL)
_URL_KEYS = ("homepage", "home", "documentation", "docs", "source", "repository", "source code", "code")


def project_url(meta: md.PackageMetadata) -> str | None:
    """The project's home page: `Home-page`, else the most home-like `Project-URL` entry."""
    home = meta.get("Home-page")
    if home and home.startswith("http"):
        return home.strip()
    urls = {}
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if url.strip().startswith("http"):
            urls[label.strip().lower()] = url.strip()
    for key in _URL_KEYS:
        if key in urls:
            return urls[key]
    return next(iter(urls.values()), None)


def module_docstring(path: Path, max_bytes: int = 65536) -> str | None:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:max_bytes]
    except OSError:
        return None
    match = _DOCSTRING.match(head)
    if not match:
        return None
    try:
        value = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None
    return value.strip() if isinstance(value, str) else None


def iter_documents(max_modules_per_package: int = 60) -> Iterator[dict]:
    seen_names: set[str] = set()
    dists = sorted(md.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower())
    for dist in dists:
        name = dist.metadata.get("Name")
        if not name or name.lower() in seen_names:
            continue
        seen_names.add(name.lower())
        url = project_url(dist.metadata)
        summary = (dist.metadata.get("Summary") or "").strip()
        description = (dist.metadata.get_payload() or dist.metadata.get("Description") or "").strip()
        if description or summary:
            text = f"{summary}\n\n{description}".strip()
            yield {"id": f"{name}/description", "text": text, "url": url, "package": name, "kind": "description"}
        files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".py"))
        count = 0
        for rel in files:
            if count >= max_modules_per_package:
                break
            doc = module_docstring(Path(dist.locate_file(rel)))
            if doc:
                count += 1
                yield {"id": f"{name}/{rel}", "text": doc, "url": url, "package": name, "kind": "docstring"}


def build_corpus(out_dir: Path, max_docs: int = 20000, shards: int = 4, max_modules_per_package: int = 60) -> int:
    """Write the corpus as `shards` JSONL files (so the pipeline's tasks share the work); returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.jsonl"):
        old.unlink()
    tmp_files = [out_dir / f".part-{i:04d}.tmp" for i in range(shards)]
    handles = [open(p, "wb") for p in tmp_files]  # noqa: SIM115 - closed below
    n = 0
    try:
        for doc in iter_documents(max_modules_per_package):
            if n >= max_docs:
                break
            handles[n % shards].write(orjson.dumps(doc) + b"\n")
            n += 1
    finally:
        for h in handles:
            h.close()
    for i, tmp in enumerate(tmp_files):  # renamed only once complete: a half-built corpus is never picked up
        tmp.replace(out_dir / f"part-{i:04d}.jsonl")
    return n
