"""Plain-text reader: one document per non-empty line (e.g. a Wikipedia dump with an article per line)."""

from __future__ import annotations

from collections.abc import Iterator

from datatrove.data import Document

from kiln.data_pipeline.readers.base import RobustReader
from kiln.data_pipeline.readers.streams import decompressed_chunks, iter_lines

_BOM = b"\xef\xbb\xbf"


class TextLinesReader(RobustReader):
    """Each non-blank line is a document with id ``<relative file>:<line>`` (1-based, blank lines counted, so the
    id points at the line in the file). Bad lines are rejected as ``invalid_utf8`` or ``too_large``."""

    name = "📄 Text lines"

    def read_file(self, relative: str) -> Iterator[Document]:
        source_file = self.full_path(relative)
        with self.data_folder.open(relative, "rb") as raw:
            for lineno, line in iter_lines(decompressed_chunks(raw)):
                if lineno == 1 and line.startswith(_BOM):
                    line = line[len(_BOM) :]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line.strip():
                    continue
                if len(line) > self.max_doc_bytes:
                    message = f"line is {len(line)} bytes, over max_doc_bytes={self.max_doc_bytes}"
                    self.reject(relative, lineno, "too_large", message, line)
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as u:
                    message = f"line is not valid UTF-8 ({u.reason} at byte {u.start} of {len(line)})"
                    self.reject(relative, lineno, "invalid_utf8", message, line)
                    continue
                yield Document(text=text, id=f"{relative}:{lineno}", metadata={"source_file": source_file})


__all__ = ["TextLinesReader"]
