"""megatron-core indexed datasets (``.bin`` + ``.idx``) written and read with numpy alone.

The files are byte-for-byte what megatron-core's ``IndexedDatasetBuilder`` writes (tested against it), so
megatron's ``IndexedDataset`` and `kiln.data_pipeline.tokenize.open_tokenized` read them, but building SFT
data needs neither torch nor megatron. ``.idx`` layout (little-endian): the 9-byte magic ``MMIDIDX\\0\\0``,
version ``<Q`` 1, dtype code ``<B``, sequence count ``<Q``, document count ``<Q`` (documents + 1), then
sequence lengths (int32), sequence byte offsets (int64) and document indices (int64: the first sequence of
each document, then the total).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """megatron's ``DType.optimal_dtype``: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Documents made of sequences, appended in order; `finalize` writes the ``.idx``."""

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number]):
        self.prefix, self.dtype = str(prefix), dtype
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(f"{self.prefix}.bin", "wb")
        self.lengths: list[int] = []
        self.doc_index: list[int] = [0]

    def add_document(self, values: np.ndarray, lengths: list[int]) -> None:
        values = np.asarray(values, dtype=self.dtype)
        if values.size != sum(lengths):
            raise ValueError(f"document of {values.size} values, sequence lengths sum to {sum(lengths)}")
        self._bin.write(values.tobytes(order="C"))
        self.lengths.extend(int(n) for n in lengths)
        self.doc_index.append(len(self.lengths))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * itemsize
        with open(f"{self.prefix}.idx", "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", len(self.doc_index)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.doc_index, dtype=np.int64).tobytes(order="C"))


class IndexedReader:
    """Memory-mapped reader of one prefix: ``sequence(i)``, ``document(d)`` and the index arrays."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        with open(f"{self.prefix}.idx", "rb") as f:
            if f.read(9) != MAGIC:
                raise ValueError(f"{self.prefix}.idx: not a megatron indexed dataset")
            (version,) = struct.unpack("<Q", f.read(8))
            (code,) = struct.unpack("<B", f.read(1))
            (n_seq,) = struct.unpack("<Q", f.read(8))
            (n_doc,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        if version != 1:
            raise ValueError(f"{self.prefix}.idx: unsupported version {version}")
        self.dtype = CODE_DTYPES[code]
        index = np.memmap(f"{self.prefix}.idx", mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(index, np.int32, n_seq, offset)
        self.sequence_pointers = np.frombuffer(index, np.int64, n_seq, offset + 4 * n_seq)
        self.document_indices = np.frombuffer(index, np.int64, n_doc, offset + 12 * n_seq)
        size = os.path.getsize(f"{self.prefix}.bin")
        self._bin = np.memmap(f"{self.prefix}.bin", mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self.sequence_lengths.size

    @property
    def documents(self) -> int:
        return self.document_indices.size - 1

    def _start(self, seq: int) -> int:
        return int(self.sequence_pointers[seq]) // np.dtype(self.dtype).itemsize

    def sequence(self, i: int) -> np.ndarray:
        start = self._start(i)
        return np.asarray(self._bin[start : start + int(self.sequence_lengths[i])])

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(values of document ``d``, the lengths of its sequences): sequences are contiguous on disk."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        lengths = np.asarray(self.sequence_lengths[first:last], dtype=np.int64)
        if first == last:
            return np.zeros(0, dtype=self.dtype), lengths
        start = self._start(first)
        return np.asarray(self._bin[start : start + int(lengths.sum())]), lengths
