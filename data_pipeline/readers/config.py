"""`InputConfig`: one input of a curation recipe (a file or a folder of JSONL, Parquet, WARC or plain text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from kiln.data_pipeline.readers.base import list_input_files, resolve_input_path

InputKind = Literal["jsonl", "parquet", "warc", "text"]


@dataclass
class InputConfig:
    """Where the raw documents of one input are and how to read them.

    kind: ``jsonl`` (one JSON object per line; ``.gz``/``.zst``/``.bz2``/``.xz`` are read transparently),
        ``parquet``, ``warc`` (response records; main text extracted from the HTML with trafilatura) or
        ``text`` (one document per non-empty line, e.g. a Wikipedia dump with an article per line).
    path: a file, or a folder whose files are sharded across tasks (file ``i`` goes to task ``i % tasks``).
    glob: pattern of the files to read inside a folder (e.g. ``"**/*.jsonl.gz"``). Without it every file is read
        except hidden/bookkeeping ones (a path component starting with ``.`` or ``_``, e.g. Spark's ``_SUCCESS``).
    text_key / id_key: record fields (JSONL, Parquet) holding the text and the document id. Records without an id
        get ``<relative file>:<line>``.
    url_key: record field holding the source URL; falls back to ``metadata.url`` (Dolma), then to the id when it
        looks like a URL (cc_net / Dolma ids are URLs).
    limit: maximum documents yielded per task by this input (-1: no limit).
    max_doc_bytes: records whose text (WARC: payload) is larger than this are rejected as ``too_large``.
    extraction_timeout_s: WARC only, per page limit for the HTML -> text extraction.
    """

    kind: InputKind
    path: str
    glob: str | None = None
    text_key: str = "text"
    id_key: str = "id"
    url_key: str = "url"
    limit: int = -1
    max_doc_bytes: int = 10_000_000
    extraction_timeout_s: float = 5.0

    def validate(self) -> None:
        kinds = get_args(InputKind)
        if self.kind not in kinds:
            raise ValueError(f"kind must be one of {list(kinds)}, got {self.kind!r}")
        if not self.path:
            raise ValueError("path is empty: give a file or a folder")
        _, _, is_dir = resolve_input_path(self.path)
        if is_dir is None:
            raise ValueError(f"input path does not exist: {self.path}")
        if not is_dir and self.glob is not None:
            raise ValueError(f"glob {self.glob!r} applies only when path is a folder, but {self.path} is a file")
        if is_dir and not list_input_files(self.path, self.glob)[1]:
            what = f"matching glob {self.glob!r}" if self.glob else "(hidden and '_' files are ignored)"
            raise ValueError(f"no input files in folder {self.path} {what}")
        if self.limit != -1 and self.limit < 1:
            raise ValueError(f"limit must be -1 (no limit) or a positive number of documents, got {self.limit}")
        if self.max_doc_bytes < 1:
            raise ValueError(f"max_doc_bytes must be positive, got {self.max_doc_bytes}")
        for key in ("text_key", "id_key", "url_key"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty")
        if self.extraction_timeout_s <= 0:
            raise ValueError(f"extraction_timeout_s must be positive, got {self.extraction_timeout_s}")


__all__ = ["InputConfig", "InputKind"]
