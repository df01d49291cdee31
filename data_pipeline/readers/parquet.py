"""Parquet reader: row-group by row-group in record batches, robust to bad rows, bad row groups, bad files."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pyarrow.parquet as pq
from datatrove.data import Document

from kiln.data_pipeline.readers.base import RecordRejected, RobustReader

BATCH_ROWS = 1024


def _row_as_text(row: dict) -> str:
    return orjson.dumps(row, default=repr, option=orjson.OPT_NON_STR_KEYS).decode("utf-8")


class ParquetReader(RobustReader):
    """Each row is a record (its ``line`` in rejects is the 1-based row number in the file).

    A file that is not Parquet, or has no text column, is one ``unreadable_file`` reject (line 0) and the other
    files go on; a row group that fails to decode is one ``unreadable_file`` reject at its first row and the next
    row groups go on. Bad rows are ``missing_text`` (null / not a string), ``invalid_utf8`` (binary column),
    ``empty_text`` or ``too_large``.
    """

    name = "🗂 Parquet (robust)"

    def read_file(self, relative: str) -> Iterator[Document]:
        with self.data_folder.open(relative, "rb") as raw:
            try:
                parquet = pq.ParquetFile(raw)
            except Exception as e:
                self.reject(relative, 0, "unreadable_file", f"not a readable Parquet file: {e}")
                return
            columns = parquet.schema_arrow.names
            if self.text_key not in columns:
                message = f"no '{self.text_key}' column; columns present: {columns}"
                self.reject(relative, 0, "unreadable_file", message)
                return
            first_row = 1
            for group in range(parquet.num_row_groups):
                group_rows = parquet.metadata.row_group(group).num_rows
                row = first_row
                try:
                    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                        records = batch.to_pylist()
                        for record in records:
                            with self.track_time():
                                try:
                                    doc = self.document_from_record(record, relative, row)
                                except RecordRejected as e:
                                    self.reject(relative, row, e.reason, e.message, _row_as_text(record))
                                    doc = None
                            row += 1
                            if doc is not None:
                                yield doc
                except Exception as e:
                    message = f"row group {group} ({group_rows} rows) cannot be decoded from row {row}: {e}"
                    self.reject(relative, row, "unreadable_file", message)
                first_row += group_rows


__all__ = ["ParquetReader"]
