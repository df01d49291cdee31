"""JSONL reader: one JSON object per line, plain or compressed (gzip, zstd, bz2, xz), robust to bad lines."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
from datatrove.data import Document

from kiln.data_pipeline.readers.base import RecordRejected, RobustReader, describe_type
from kiln.data_pipeline.readers.streams import decompressed_chunks, iter_lines

_BOM = b"\xef\xbb\xbf"


class JsonlReader(RobustReader):
    """Reads JSONL line by line in binary and parses each line on its own, so one bad line costs one record.

    Blank lines are skipped (they are not records). Bad lines are rejected as ``invalid_utf8``,
    ``malformed_json``, ``not_an_object``, ``missing_text``, ``empty_text`` or ``too_large``; a compressed file cut
    short keeps every complete line and adds one ``truncated_file`` reject with the partial line.
    """

    name = "📒 JSONL (robust)"

    def read_file(self, relative: str) -> Iterator[Document]:
        with self.data_folder.open(relative, "rb") as raw:
            for lineno, line in iter_lines(decompressed_chunks(raw)):
                if lineno == 1 and line.startswith(_BOM):
                    line = line[len(_BOM) :]
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        doc = self.parse_line(line, relative, lineno)
                    except RecordRejected as e:
                        self.reject(relative, lineno, e.reason, e.message, line)
                        continue
                yield doc

    def parse_line(self, line: bytes, relative: str, lineno: int) -> Document:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as u:
                raise RecordRejected(
                    "invalid_utf8", f"line is not valid UTF-8 ({u.reason} at byte {u.start} of {len(line)})"
                ) from None
            raise RecordRejected("malformed_json", f"not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise RecordRejected("not_an_object", f"line is JSON {describe_type(record)}, expected an object")
        return self.document_from_record(record, relative, lineno)


__all__ = ["JsonlReader"]
