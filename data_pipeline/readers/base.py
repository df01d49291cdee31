"""What every reader shares: file listing and sharding, per-reason rejects, stats, limit, chaining.

Accounting of one reader step (datatrove stats of the step):

- ``documents``: documents yielded by this reader (documents passed through from earlier steps are not counted);
- ``rejected`` and ``rejected_<reason>``: bad records, each also written to ``{rejects_folder}/{rank:05d}.jsonl``;
- ``input_files``: files read by this task.

Reject reasons are :data:`REJECT_REASONS`. A reject record is one JSON object per line:
``{"file", "line", "reason", "message", "raw"}`` where ``file`` is the full path, ``line`` is 1-based (0 = the
whole file, e.g. a Parquet file without the text column) and ``raw`` is the raw record as text (invalid UTF-8
bytes escaped with ``backslashreplace``, so nothing is lost).
"""

from __future__ import annotations

import contextlib
import re
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolder, get_datafolder
from datatrove.pipeline.readers.base import BaseReader
from datatrove.utils.logging import logger
from fsspec.core import url_to_fs
from tqdm import tqdm

from kiln.data_pipeline.readers.streams import StreamDamaged

REJECT_REASONS = (
    "malformed_json",
    "not_an_object",
    "invalid_utf8",
    "missing_text",
    "empty_text",
    "too_large",
    "truncated_file",
    "unreadable_file",
)

# Warnings logged individually per file; the rest are summed up in one line at the end of the file.
WARNINGS_PER_FILE = 5

_URL_RE = re.compile(r"^https?://", re.IGNORECASE)


def resolve_input_path(path: str) -> tuple[Any, str, bool | None]:
    """(filesystem, path in it, True for a folder / False for a file / None when it does not exist)."""
    try:
        fs, fs_path = url_to_fs(path)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise ValueError(f"cannot open input path {path}: {e}") from e
    if fs.isdir(fs_path):
        return fs, fs_path, True
    if fs.isfile(fs_path):
        return fs, fs_path, False
    return fs, fs_path, None


def _is_hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.replace("\\", "/").split("/") if part)


def list_input_files(path: str, glob: str | None = None) -> tuple[DataFolder, list[str]]:
    """The folder that ids are relative to, and the sorted relative paths of the input files.

    A file path gives its parent folder and its name; a folder gives its files (recursively, or those matching
    ``glob``; without a glob, hidden and ``_``-prefixed files such as ``_SUCCESS`` are skipped).
    """
    fs, fs_path, is_dir = resolve_input_path(path)
    if is_dir is None:
        raise FileNotFoundError(f"input path does not exist: {path}")
    if not is_dir:
        parent = fs._parent(fs_path)
        name = fs_path[len(parent) :].lstrip("/")
        return DataFolder(parent, fs=fs), [name]
    folder = DataFolder(fs_path, fs=fs)
    files = folder.list_files(recursive=True, glob_pattern=glob)
    if glob is None:
        files = [f for f in files if not _is_hidden(f)]
    return folder, files


def describe_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


class RecordRejected(Exception):
    """A record is bad: why (one of REJECT_REASONS) and a human-readable message (without the file:line)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class RejectsWriter:
    """Writes reject records to ``{folder}/{rank:05d}.jsonl``; opened on the first reject only.

    Each input of a recipe gets its own rejects folder, so the file is truncated when a task starts writing:
    a task re-run after a crash rewrites its rejects instead of appending duplicates.
    """

    def __init__(self, folder: str, rank: int):
        self.folder = get_datafolder(folder)
        self.filename = f"{rank:05d}.jsonl"
        self._file = None

    @property
    def path(self) -> str:
        return self.folder.resolve_paths(self.filename)

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = self.folder.open(self.filename, "wb")
        self._file.write(orjson.dumps(record) + b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RobustReader(BaseReader):
    """Base of our readers: a datatrove reader step that never lets one bad record or file stop the task.

    Subclasses implement :meth:`read_file`, which yields documents and calls :meth:`reject` for bad records.
    """

    type = "📖 - READER"

    def __init__(
        self,
        path: str,
        rejects_folder: str,
        glob: str | None = None,
        text_key: str = "text",
        id_key: str = "id",
        url_key: str = "url",
        limit: int = -1,
        max_doc_bytes: int = 10_000_000,
        progress: bool = False,
    ):
        super().__init__(limit=limit, text_key=text_key, id_key=id_key)
        self.path = path
        self.rejects_folder = rejects_folder
        self.glob = glob
        self.url_key = url_key
        self.max_doc_bytes = max_doc_bytes
        self.progress = progress
        self._rejects: RejectsWriter | None = None
        self._file_rejects: Counter[str] = Counter()
        self.data_folder: DataFolder | None = None

    # ---- sharding -------------------------------------------------------------------------------------------
    def get_shard(self, rank: int, world_size: int) -> list[str]:
        """This task's files: every ``world_size``-th file of the sorted listing, from ``rank`` (as datatrove)."""
        self.data_folder, files = list_input_files(self.path, self.glob)
        return files[rank::world_size]

    def full_path(self, relative: str) -> str:
        return self.data_folder.resolve_paths(relative)

    # ---- rejects --------------------------------------------------------------------------------------------
    def reject(self, relative: str, line: int, reason: str, message: str, raw: bytes | str = b"") -> None:
        """Count a bad record (``rejected``, ``rejected_<reason>``), write it to the rejects file, warn."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        self.stat_update("rejected", f"rejected_{reason}")
        path = self.full_path(relative)
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="backslashreplace")
        if self._rejects is not None:
            self._rejects.write({"file": path, "line": line, "reason": reason, "message": message, "raw": raw})
        self._file_rejects[reason] += 1
        if self._file_rejects.total() <= WARNINGS_PER_FILE:
            where = f"{path}:{line}" if line else path
            logger.warning(f"rejected ({reason}) {where}: {message}")

    # ---- records -> documents -------------------------------------------------------------------------------
    def check_text(self, text: Any) -> str:
        """The document text of a record field, or RecordRejected (null/non-string, empty, too large)."""
        key = self.text_key
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                message = f"'{key}' is not valid UTF-8 ({e.reason} at byte {e.start})"
                raise RecordRejected("invalid_utf8", message) from None
        if not isinstance(text, str):
            raise RecordRejected("missing_text", f"'{key}' is {describe_type(text)}, expected a string")
        if not text.strip():
            what = "empty" if not text else f"whitespace only ({len(text)} characters)"
            raise RecordRejected("empty_text", f"'{key}' is {what}")
        # each character is 1 to 4 UTF-8 bytes: encode only when the length alone does not decide
        if len(text) > self.max_doc_bytes or (
            4 * len(text) > self.max_doc_bytes and len(text.encode("utf-8")) > self.max_doc_bytes
        ):
            size = len(text.encode("utf-8"))
            raise RecordRejected("too_large", f"'{key}' is {size} bytes, over max_doc_bytes={self.max_doc_bytes}")
        return text

    def document_from_record(self, record: dict, relative: str, line: int) -> Document:
        """A JSON/Parquet record -> Document, as datatrove's default adapter does (the record's ``metadata``
        object, then its other fields, become the document metadata), plus ``url`` and ``source_file``."""
        if self.text_key not in record:
            raise RecordRejected("missing_text", f"no '{self.text_key}' field; keys present: {list(record)}")
        text = self.check_text(record[self.text_key])
        doc_id = record.get(self.id_key)
        if doc_id is None or doc_id == "":
            doc_id = f"{relative}:{line}"
        nested = record.get("metadata")
        if isinstance(nested, dict):
            metadata = dict(nested)
        elif nested is None:
            metadata = {}
        else:
            metadata = {"metadata": nested}
        skip = (self.text_key, self.id_key, "metadata")
        metadata.update((k, v) for k, v in record.items() if k not in skip)
        url = self.find_url(record, nested, doc_id)
        if url:
            metadata["url"] = url
        elif "url" in metadata and (metadata["url"] is None or isinstance(metadata["url"], str)):
            del metadata["url"]  # a null or blank url field: no url rather than None or ""
        metadata["source_file"] = self.full_path(relative)
        return Document(text=text, id=str(doc_id), metadata=metadata)

    def find_url(self, record: dict, nested: Any, doc_id: Any) -> str | None:
        """``record[url_key]``, else ``record["metadata"]["url"]`` (Dolma), else the id when it is a URL (cc_net)."""
        url = record.get(self.url_key)
        if isinstance(url, str) and url.strip():
            return url.strip()
        if isinstance(nested, dict):
            url = nested.get("url")
            if isinstance(url, str) and url.strip():
                return url.strip()
        if isinstance(doc_id, str) and _URL_RE.match(doc_id):
            return doc_id
        return None

    # ---- the step -------------------------------------------------------------------------------------------
    @abstractmethod
    def read_file(self, relative: str) -> Iterator[Document]:
        """Yield the documents of one file (path relative to ``self.data_folder``); call ``reject`` for bad ones."""

    def _read_file_guarded(self, relative: str) -> Iterator[Document]:
        """read_file, with any unexpected error turned into one ``unreadable_file`` reject (the task goes on)."""
        self._file_rejects = Counter()
        try:
            yield from self.read_file(relative)
        except StreamDamaged as e:
            self.reject(relative, e.line, e.reason, e.message, e.raw)
        except Exception as e:  # one broken file must not stop the others
            self.reject(relative, 0, "unreadable_file", f"{type(e).__name__}: {e}")
        total = self._file_rejects.total()
        if total > WARNINGS_PER_FILE:
            logger.warning(
                f"{self.full_path(relative)}: {total} records rejected ({dict(self._file_rejects)}); only the "
                f"first {WARNINGS_PER_FILE} were logged, all are in {self._rejects.path}"
            )

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        shard = self.get_shard(rank, world_size)
        if not shard:
            logger.warning(f"{self.name}: no files of {self.path} for task {rank} of {world_size}")
            return
        self._log_limit_scope(rank, world_size)
        self._rejects = RejectsWriter(self.rejects_folder, rank)
        yielded = 0
        try:
            with (
                tqdm(total=len(shard), desc="Files", unit="file", disable=not self.progress) as file_bar,
                tqdm(desc="Documents", unit="doc", disable=not self.progress) as doc_bar,
            ):
                for i, relative in enumerate(shard):
                    self.stat_update("input_files")
                    logger.info(f"Reading input file {self.full_path(relative)}, {i + 1}/{len(shard)}")
                    with contextlib.closing(self._read_file_guarded(relative)) as docs:
                        for doc in docs:
                            self.stat_update("documents")
                            self.update_doc_stats(doc)
                            yield doc
                            doc_bar.update()
                            yielded += 1
                            if self.limit != -1 and yielded >= self.limit:
                                return
                    file_bar.update()
        finally:
            self._rejects.close()


__all__ = [
    "REJECT_REASONS",
    "RecordRejected",
    "RejectsWriter",
    "RobustReader",
    "describe_type",
    "list_input_files",
    "resolve_input_path",
]
