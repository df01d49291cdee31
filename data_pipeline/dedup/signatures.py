"""Stage 1: compute each document's dedup keys (content hash, URL hash, MinHash band hashes) and pass it on."""

from __future__ import annotations

import os

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

from kiln.config import validate_tree

from .config import DedupConfig
from .hashing import MinHasher, content_hash, url_hash
from .storage import RankSignatureWriter


def url_key(doc: Document, cfg: DedupConfig) -> int:
    """What URL dedup compares: the normalised URL's hash. Pieces of one document split by decontamination share
    their parent's URL, so a piece's key also hashes its piece number: piece k of two copies of a page still
    collide, but the pieces of one page do not remove each other."""
    key = url_hash(doc.metadata.get("url"), cfg)
    piece = (doc.metadata.get("decontaminate") or {}).get("piece")
    if key == 0 or piece is None:
        return key
    return xxhash.xxh3_64_intdigest(f"{key}:piece:{piece}".encode()) or 1


class DedupSignatures(PipelineStep):
    """Pass-through step that writes this rank's per-doc dedup keys under ``folder/signatures/<rank>``.

    The document's position in the rank's stream is its index; ``DedupFilter`` must later see the same documents
    in the same order at the same rank. Documents are hashed in batches of ``batch_size`` (all their shingles
    go through the MinHash permutations as one matrix op) and yielded unchanged after their batch is hashed, so
    memory is bounded by one batch plus the open output files.
    """

    type = "🫂 - DEDUP"
    name = "🔑 dedup signatures"

    def __init__(self, cfg: DedupConfig, folder: str | os.PathLike, batch_size: int = 256):
        super().__init__()
        validate_tree(cfg)  # DedupConfig and its minhash section, each once
        self.cfg = cfg
        self.folder = os.fspath(folder)
        self.batch_size = batch_size
        self.minhasher = MinHasher(cfg.minhash) if cfg.minhash is not None else None

    def hash_batch(self, docs: list[Document]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Key columns for a batch: {"exact": (n,), "url": (n,), "band_000": (n,), ...} and the 32-bit signatures."""
        cfg = self.cfg
        columns: dict[str, np.ndarray] = {}
        if cfg.exact:
            columns["exact"] = np.fromiter((content_hash(d.text, cfg) for d in docs), dtype=np.uint64, count=len(docs))
        if cfg.url:
            columns["url"] = np.fromiter((url_key(d, cfg) for d in docs), dtype=np.uint64, count=len(docs))
        sigs32 = None
        if self.minhasher is not None:
            shingles = [self.minhasher.shingles(d.text) for d in docs]
            sigs, valid = self.minhasher.signatures(shingles)
            bands = self.minhasher.band_hashes(sigs, valid)
            for b in range(bands.shape[1]):
                columns[f"band_{b:03d}"] = bands[:, b]
            sigs32 = sigs.astype(np.uint32)  # low 32 bits; invalid docs hold 0xFFFFFFFF and are never compared
            n_short = int((~valid).sum())
            if n_short:
                self.stat_update("minhash_too_short", value=n_short)
        return columns, sigs32

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        writer = RankSignatureWriter(self.folder, rank, self.cfg)
        try:
            batch: list[Document] = []
            for doc in data:
                self.stat_update(StatHints.total)
                batch.append(doc)
                if len(batch) >= self.batch_size:
                    with self.track_time(unit="batch"):
                        writer.append(*self.hash_batch(batch))
                    yield from batch
                    batch = []
            if batch:
                with self.track_time(unit="batch"):
                    writer.append(*self.hash_batch(batch))
                yield from batch
        except BaseException:
            writer.abort()
            raise
        writer.commit()
