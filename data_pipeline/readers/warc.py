"""WARC reader: response records -> main text of the HTML (trafilatura, in a sandbox process with a timeout).

Why our own instead of datatrove's ``WarcReader`` + ``Trafilatura`` steps: datatrove's reader needs ``cchardet``
and ``python-magic`` (not installed here), warcio ends a ``.warc.gz`` cut short silently, and an extractor step
placed after the readers would also "extract" the documents of the JSONL/Parquet readers chained before it.

Accounting (stats of this step), for the response records (and WET ``conversion`` records) of its files:
``warc_records = documents + dropped + rejected``, where ``dropped`` is split by reason into
``dropped_extraction_empty`` (trafilatura found no main text: navigation pages, redirects, empty bodies),
``dropped_extraction_timeout``, ``dropped_extraction_error`` and ``dropped_not_html`` (e.g. a PDF or an image),
and rejects are ``too_large`` (payload over max_doc_bytes), ``truncated_file`` (the record cut by the end of a
damaged file) or ``unreadable_file`` (a payload that cannot be decoded). A file cut short or unparsable after
some records also counts one ``truncated_file``/``unreadable_file`` reject. In rejects, ``line`` is the 1-based
record number in the file (all record types counted) and ``raw`` holds the record's WARC and HTTP headers.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from datatrove.data import Document
from datatrove.pipeline.extractors.base import ExtractorSandbox

from kiln.data_pipeline.readers.base import RobustReader
from kiln.data_pipeline.readers.streams import StreamDamaged, decompressed_chunks

HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHARSET_RE = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)


def extract_main_text(html: str | bytes) -> str | None:
    """Main text of an HTML page (trafilatura with datatrove's/FineWeb's settings). Module level: it runs in the
    sandbox process."""
    from trafilatura import extract

    return extract(html, favor_precision=True, include_comments=False, deduplicate=True)


class _DecompressedStream(io.RawIOBase):
    """A file object over :func:`decompressed_chunks` for warcio: damage ends the stream and is kept in ``error``.

    Copies each decompressed chunk out once (no re-slicing of a growing buffer on every small read)."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._chunks = decompressed_chunks(raw)
        self._chunk = b""
        self._pos = 0
        self._done = False
        self.error: StreamDamaged | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._chunk):
            if self._done:
                return 0
            try:
                self._chunk, self._pos = next(self._chunks), 0
            except StopIteration:
                self._done = True
            except StreamDamaged as e:
                self.error, self._done = e, True
        n = min(len(buffer), len(self._chunk) - self._pos)
        buffer[:n] = self._chunk[self._pos : self._pos + n]
        self._pos += n
        return n


@dataclass
class _Page:
    number: int  # 1-based record number in the file
    rec_type: str
    record_id: str | None
    url: str | None
    date: str | None
    content_type: str | None
    headers: str
    payload: bytes | None = None
    payload_error: str | None = None

    @property
    def where(self) -> str:
        return f"record {self.number} ({self.url or 'no WARC-Target-URI'})"


class WarcReader(RobustReader):
    """Reads the response (and WET conversion) records of WARC files, plain or gzip/zstd compressed (whole-file
    or per-record), and yields one document per page with main text: ``id`` = WARC-Record-ID,
    ``metadata["url"]`` = WARC-Target-URI, ``metadata["date"]`` = WARC-Date, ``metadata["source_file"]``."""

    name = "🕷 WARC (robust)"

    def __init__(self, *args, extraction_timeout_s: float = 5.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.extraction_timeout_s = extraction_timeout_s

    def read_file(self, relative: str) -> Iterator[Document]:
        import trafilatura  # noqa: F401 - imported here so that the forked sandbox process starts warm
        from warcio.archiveiterator import ArchiveIterator

        with (
            self.data_folder.open(relative, "rb") as raw,
            ExtractorSandbox(timeout=self.extraction_timeout_s, warmup_text="") as sandbox,
        ):
            stream = _DecompressedStream(raw)
            # one record of look-ahead: the last record read before the stream broke is the partial one
            pending: tuple[int, _Page | None] | None = None
            number = 0
            failure: Exception | None = None
            try:
                for number, record in enumerate(ArchiveIterator(stream), start=1):
                    page = self._take(record, number)
                    if pending is not None and pending[1] is not None:
                        yield from self._finish(pending[1], relative, sandbox)
                    pending = (number, page)
            except Exception as e:  # warcio: unparsable headers, bad record framing...
                failure = e
            cut = stream.error
            if pending is not None and pending[1] is not None and (cut is None or failure is not None):
                yield from self._finish(pending[1], relative, sandbox)
                pending = None
            if cut is not None:
                if pending is not None:  # the partial record
                    page = pending[1]
                    line = pending[0]
                    what = page.where if page else f"record {line}"
                    raw_text = page.headers if page else ""
                else:
                    what = f"after record {number}" if number else "before the first record"
                    line, raw_text = number + 1, ""
                self.reject(relative, line, cut.reason, f"{what}: {cut.message}", raw_text)
            elif failure is not None:
                where = f"after record {number}" if number else "at the first record"
                message = f"cannot parse the WARC {where}: {type(failure).__name__}: {failure}"
                self.reject(relative, number + 1, "unreadable_file", message)

    def _take(self, record, number: int) -> _Page | None:
        """Read what is needed of a record before the iterator moves on (None: not a page)."""
        if record.rec_type not in ("response", "conversion"):
            return None
        self.stat_update("warc_records")
        headers = record.rec_headers
        content_type = None
        if record.http_headers is not None:
            content_type = record.http_headers.get_header("Content-Type")
        content_type = content_type or headers.get_header("WARC-Identified-Payload-Type")
        if record.rec_type == "conversion":
            content_type = content_type or "text/plain"
        header_text = headers.to_str() + (record.http_headers.to_str() if record.http_headers is not None else "")
        page = _Page(
            number=number,
            rec_type=record.rec_type,
            record_id=headers.get_header("WARC-Record-ID"),
            url=headers.get_header("WARC-Target-URI"),
            date=headers.get_header("WARC-Date"),
            content_type=content_type,
            headers=header_text,
        )
        try:
            page.payload = record.content_stream().read(self.max_doc_bytes + 1)
        except Exception as e:  # e.g. a bad Content-Encoding
            page.payload_error = f"{type(e).__name__}: {e}"
        return page

    def _drop(self, reason: str) -> None:
        self.stat_update("dropped", f"dropped_{reason}")

    def _finish(self, page: _Page, relative: str, sandbox: ExtractorSandbox) -> Iterator[Document]:
        if page.payload_error is not None:
            message = f"{page.where}: cannot read the payload: {page.payload_error}"
            self.reject(relative, page.number, "unreadable_file", message, page.headers)
            return
        if len(page.payload) > self.max_doc_bytes:
            message = f"{page.where}: payload is over max_doc_bytes={self.max_doc_bytes}"
            self.reject(relative, page.number, "too_large", message, page.headers)
            return
        mime = (page.content_type or "").split(";")[0].strip().lower()
        if page.rec_type == "conversion":
            text = page.payload.decode("utf-8", errors="replace")
        elif mime and mime not in HTML_TYPES:
            self._drop("not_html")
            return
        else:
            html = _decode_html(page.payload, page.content_type)
            with self.track_time():
                try:
                    text = sandbox.process_document(html, extract_main_text)
                except TimeoutError:
                    self._drop("extraction_timeout")
                    return
                except Exception:  # the extractor raised, or its process died (EOFError)
                    self._drop("extraction_error")
                    return
        if not text or not text.strip():
            self._drop("extraction_empty")
            return
        metadata = {"url": page.url, "date": page.date, "source_file": self.full_path(relative)}
        metadata = {k: v for k, v in metadata.items() if v is not None}
        yield Document(text=text, id=page.record_id or f"{relative}:{page.number}", metadata=metadata)


def _decode_html(payload: bytes, content_type: str | None) -> str | bytes:
    """Text with the declared charset, else UTF-8; else the bytes (trafilatura then detects the encoding)."""
    match = _CHARSET_RE.search(content_type or "")
    for charset in ([match.group(1)] if match else []) + ["utf-8"]:
        try:
            return payload.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    return payload


__all__ = ["WarcReader", "extract_main_text"]
