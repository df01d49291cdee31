"""Stage 3: drop the documents the clustering stage marked, counted by reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from kiln.config import validate_tree

from .config import DedupConfig
from .storage import REASONS, REMOVE_DTYPE, rank_dir


class DedupFilter(BaseFilter):
    """Drops duplicates: at rank r it must see the same documents in the same order as ``DedupSignatures`` did.

    Dropped documents are counted as ``dropped_exact_duplicate`` / ``dropped_url_duplicate`` /
    ``dropped_minhash_duplicate`` (one reason per document, precedence exact > url > minhash) and, when an
    ``exclusion_writer`` is given, written there with ``metadata["duplicate_of"] = [rank, index]`` of the kept
    document (its position in rank ``rank``'s input stream). Raises if the number of documents seen differs from
    what ``DedupSignatures`` saw at this rank, since the drop list would then point at the wrong documents.
    """

    name = "🫂 dedup filter"

    def __init__(self, cfg: DedupConfig, folder: str | os.PathLike, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        validate_tree(cfg)  # DedupConfig and its minhash section, each once
        self.cfg = cfg
        self.folder = os.fspath(folder)
        self._remove = np.empty(0, dtype=REMOVE_DTYPE)
        self._cursor = 0
        self._index = 0

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        index = self._index
        self._index += 1
        if self._cursor < len(self._remove) and self._remove["index"][self._cursor] == index:
            row = self._remove[self._cursor]
            self._cursor += 1
            doc.metadata["duplicate_of"] = [int(row["keep_rank"]), int(row["keep_index"])]
            return False, REASONS[int(row["reason"])]
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / "remove" / f"{rank:05d}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the stages of find_duplicate_stages() first")
        self._remove = np.load(path)
        self._cursor, self._index = 0, 0
        yield from super().run(data, rank, world_size)
        manifest = rank_dir(self.folder, rank) / "manifest.json"
        if manifest.is_file():
            expected = json.loads(manifest.read_text())["n_docs"]
            if self._index != expected:
                raise ValueError(
                    f"DedupFilter rank {rank} saw {self._index} documents but DedupSignatures saw {expected}: "
                    "the input of the dedup filter must be the same documents in the same order"
                )
