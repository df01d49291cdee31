"""The trainer's reader of packed SFT data (format ``kiln-sft-packed-v1``, see data_pipeline/CONTRACTS.md).

Packed sequence ``i`` is megatron document ``i``: its conversations are the document's sequences, laid end to
end, then padded to ``pack_tokens = seq_length + 1`` with ``pad_id``. `read` returns exactly what
`kiln.pretrain.data.pack_sample` takes (tokens, loss mask, document-start flags), so a trainer gets the usual
aligned fields from ``pack_sample(*dataset.read(i))``:

- ``input_ids = t[:-1]``, ``labels = t[1:]``, ``loss_mask = mask[1:]`` with every label that opens a
  conversation masked (no label on a conversation's first token);
- ``segment_ids`` change at every conversation start (the pad run is a segment of its own), so attention stays
  inside each conversation, and ``position_ids`` restart at 0 in each.

Document boundaries come from the index (never from EOS tokens). `fields` computes the same fields in numpy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kiln.data_pipeline.sft.indexed import IndexedReader
from kiln.data_pipeline.sft.writer import FORMAT, LOSS_MASK_SUFFIX, META_SUFFIX, SOURCES_SUFFIX


class SFTPackedDataset:
    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        meta_path = Path(f"{self.prefix}{META_SUFFIX}")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {self.prefix} is not a finished `kiln data sft` output")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.prefix}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.tokens = IndexedReader(self.prefix)
        self.mask = IndexedReader(self.prefix + LOSS_MASK_SUFFIX)
        if not np.array_equal(self.tokens.sequence_lengths, self.mask.sequence_lengths):
            raise ValueError(f"{self.prefix}: tokens and loss mask have different sequence lengths")
        self.source_ids = np.load(self.prefix + SOURCES_SUFFIX)
        self.pack_tokens = int(self.meta["pack_tokens"])
        self.pad_id = int(self.meta["pad_id"])

    def __len__(self) -> int:
        return self.tokens.documents

    def conversations(self, i: int) -> np.ndarray:
        """Lengths of the conversations packed in sequence ``i``."""
        return self.tokens.document(i)[1]

    def sources(self, i: int) -> list[str]:
        first, last = int(self.tokens.document_indices[i]), int(self.tokens.document_indices[i + 1])
        return [self.meta["sources"][int(s)] for s in self.source_ids[first:last]]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int64, loss mask uint8, conversation-start flags bool), each ``pack_tokens`` long."""
        if not 0 <= i < len(self):
            raise IndexError(f"packed sequence {i} out of range ({len(self)} sequences)")
        values, lengths = self.tokens.document(i)
        mask, _ = self.mask.document(i)
        n = int(lengths.sum())
        tokens = np.full(self.pack_tokens, self.pad_id, dtype=np.int64)
        loss = np.zeros(self.pack_tokens, dtype=np.uint8)
        starts = np.zeros(self.pack_tokens, dtype=bool)
        tokens[:n], loss[:n] = values, mask
        starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
        if n < self.pack_tokens:
            starts[n] = True  # the padding is a segment of its own
        loss[starts] = 0
        return tokens, loss, starts

    def fields(self, i: int) -> dict[str, np.ndarray]:
        """What `kiln.pretrain.data.pack_sample` makes of `read`, in numpy (``seq_length`` long each)."""
        tokens, mask, starts = self.read(i)
        label_mask = mask[1:].astype(np.float32)
        label_mask[starts[1:]] = 0.0
        in_starts = starts[:-1]
        idx = np.arange(in_starts.size)
        first = np.maximum.accumulate(np.where(in_starts, idx, 0))
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": label_mask,
            "position_ids": idx - first,
            "segment_ids": np.cumsum(in_starts) - int(in_starts[0]),
        }
