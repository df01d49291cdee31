"""Byte streams of input files: transparent decompression and line splitting that survive damaged files.

Why not ``gzip.open(...)`` + ``for line in f``: a file cut short (an interrupted download or copy) raises in the
middle of the iteration and the lines already decompressed but still in the buffer are lost; a ``.zst`` file cut
short is not even reported by ``zstandard``'s stream reader (it just ends). Here every complete line before the
damage is yielded, then :class:`StreamDamaged` says what happened, with the partial last line.

The compression is recognised from the file's first bytes (magic numbers), not its name: a ``.gz`` that a server
already decompressed, or a gzip file named ``.jsonl``, is read correctly.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

CHUNK_BYTES = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class StreamDamaged(Exception):
    """The byte stream of a file ends early (``truncated_file``) or cannot be decoded (``unreadable_file``).

    ``line`` (1-based) and ``raw`` are filled in by :func:`iter_lines`: the line where the damage is and the bytes
    of that partial line (possibly empty).
    """

    def __init__(self, reason: str, message: str, line: int = 0, raw: bytes = b""):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.line = line
        self.raw = raw


def sniff_compression(head: bytes) -> str | None:
    """``gzip``, ``zstd``, ``bz2``, ``xz`` or None (plain) from the first bytes of a file."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if len(head) >= 10 and head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "bz2"
    return None


class _Prepended:
    """A read-only file object that first returns ``head`` (bytes already read to sniff) and then ``raw``."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self._head = head
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw.read(size)

    def readable(self) -> bool:
        return True


def _read_head(raw: BinaryIO, size: int) -> bytes:
    head = b""
    while len(head) < size:
        data = raw.read(size - len(head))
        if not data:
            break
        head += data
    return head


def decompressed_chunks(raw: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the decompressed content of ``raw`` in chunks; raise :class:`StreamDamaged` where it breaks."""
    try:
        head = _read_head(raw, 10)
    except OSError as e:
        raise StreamDamaged("unreadable_file", f"cannot read the file: {e}") from e
    kind = sniff_compression(head)
    src = _Prepended(head, raw)
    if kind == "zstd":
        yield from _zstd_chunks(src, chunk_bytes)
        return
    if kind is None:
        reader = src
    elif kind == "gzip":
        reader = gzip.GzipFile(fileobj=src, mode="rb")
    elif kind == "bz2":
        reader = bz2.BZ2File(src, mode="rb")
    else:
        reader = lzma.LZMAFile(src, mode="rb")
    while True:
        try:
            # read1: one decompression step at a time, so that an error cannot swallow data already decompressed
            data = reader.read1(chunk_bytes) if kind else reader.read(chunk_bytes)
        except EOFError as e:
            raise StreamDamaged(
                "truncated_file", f"{kind} stream ends before its end-of-stream marker (file cut short): {e}"
            ) from e
        except (OSError, zlib.error, lzma.LZMAError, ValueError) as e:
            what = f"{kind} data is corrupt" if kind else "read error"
            raise StreamDamaged("unreadable_file", f"{what}: {e}") from e
        if not data:
            return
        yield data


def _zstd_chunks(src: _Prepended, chunk_bytes: int) -> Iterator[bytes]:
    """zstd frames one after another; a frame that has started but not finished at end of input = truncated."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    fed = False  # has the current frame received any input?
    while True:
        try:
            data = src.read(chunk_bytes)
        except OSError as e:
            raise StreamDamaged("unreadable_file", f"read error: {e}") from e
        if not data:
            break
        while data:
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise StreamDamaged("unreadable_file", f"zstd data is corrupt: {e}") from e
            fed = True
            if out:
                yield out
            if dobj.eof:
                data = dobj.unused_data
                dobj = dctx.decompressobj()
                fed = False
            else:
                data = b""
    if fed and not dobj.eof:
        raise StreamDamaged("truncated_file", "zstd frame ends before its end (file cut short)")


def iter_lines(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number (1-based), line without its newline)`` for every line, including empty ones.

    A last line without a final newline is a line when the stream ends cleanly; when the stream is damaged it is
    the partial line carried by the :class:`StreamDamaged` that is raised (with its line number).
    """
    lineno = 0
    pending: list[bytes] = []
    try:
        for chunk in chunks:
            if b"\n" not in chunk:
                pending.append(chunk)
                continue
            parts = chunk.split(b"\n")
            if pending:
                pending.append(parts[0])
                parts[0] = b"".join(pending)
                pending = []
            last = parts.pop()
            for line in parts:
                lineno += 1
                yield lineno, line
            if last:
                pending.append(last)
    except StreamDamaged as e:
        e.line = lineno + 1
        e.raw = b"".join(pending)
        raise
    if pending:
        yield lineno + 1, b"".join(pending)


__all__ = ["CHUNK_BYTES", "StreamDamaged", "decompressed_chunks", "iter_lines", "sniff_compression"]
