"""On-disk layout shared by the dedup stages (a local or shared filesystem path).

    folder/
      signatures/<rank:05d>/manifest.json    n_docs, keys, config fingerprint (written last: marks the rank done)
      signatures/<rank:05d>/<key>.u64        one little-endian uint64 per doc, in stream order; 0 = no key
                                             keys: "exact", "url", "band_000" ... "band_<buckets-1>"
      signatures/<rank:05d>/minhash.u32      (n_docs, buckets * hashes_per_bucket) uint32: low 32 bits of each
                                             min-hash, read only for candidate-pair verification
      pairs/<key>/<worker:03d>.npy           (m, 2) int64 candidate pairs (kept-candidate gid, duplicate gid)
      remove/<rank:05d>.npy                  structured array REMOVE_DTYPE, sorted by index
      summary.json                           counts from the clustering stage

A document's global id (gid) is ``offset[rank] + index`` with offsets the prefix sums of the ranks' doc counts,
so gid order is (rank, index) order. Each rank's signature directory is written under a temporary name and
renamed when complete, so a crashed or re-run task never leaves a half-written rank behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .config import DedupConfig

REASONS = {1: "exact_duplicate", 2: "url_duplicate", 3: "minhash_duplicate"}
REASON_CODES = {v: k for k, v in REASONS.items()}
REMOVE_DTYPE = np.dtype([("index", "<i8"), ("reason", "u1"), ("keep_rank", "<i4"), ("keep_index", "<i8")])
KIND_OF_KEY = {"exact": "exact", "url": "url"}


def keys_for(cfg: DedupConfig) -> list[str]:
    """The hash keys a config produces, in the order the middle stage assigns them to tasks."""
    keys = []
    if cfg.exact:
        keys.append("exact")
    if cfg.url:
        keys.append("url")
    if cfg.minhash is not None:
        keys += [f"band_{b:03d}" for b in range(cfg.minhash.buckets)]
    return keys


def kind_of(key: str) -> str:
    return KIND_OF_KEY.get(key, "minhash")


def rank_dir(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / "signatures" / f"{rank:05d}"


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RankSignatureWriter:
    """Appends one rank's per-doc hashes to raw files in a temporary directory; ``commit`` publishes it."""

    def __init__(self, folder: str | os.PathLike, rank: int, cfg: DedupConfig):
        self.final = rank_dir(folder, rank)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.cfg = cfg
        self.keys = keys_for(cfg)
        self.files = {key: open(self.tmp / f"{key}.u64", "wb") for key in self.keys}
        self.sig_file = open(self.tmp / "minhash.u32", "wb") if cfg.minhash is not None else None
        self.n_docs = 0

    def append(self, columns: dict[str, np.ndarray], sigs32: np.ndarray | None) -> None:
        n = None
        for key in self.keys:
            col = np.ascontiguousarray(columns[key], dtype="<u8")
            n = len(col) if n is None else n
            assert len(col) == n, f"column {key} has {len(col)} rows, expected {n}"
            self.files[key].write(col.tobytes())
        if self.sig_file is not None:
            self.sig_file.write(np.ascontiguousarray(sigs32, dtype="<u4").tobytes())
        self.n_docs += n or 0

    def commit(self) -> None:
        for f in self.files.values():
            f.close()
        if self.sig_file is not None:
            self.sig_file.close()
        atomic_write_json(
            self.tmp / "manifest.json",
            {"n_docs": self.n_docs, "keys": self.keys, "config": self.cfg.fingerprint()},
        )
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        if self.sig_file is not None:
            self.sig_file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def load_manifests(folder: str | os.PathLike, num_input_tasks: int, cfg: DedupConfig) -> np.ndarray:
    """Doc counts of every input rank (checked against the config); raises if a rank is missing."""
    counts = np.zeros(num_input_tasks, dtype=np.int64)
    want = cfg.fingerprint()
    for rank in range(num_input_tasks):
        path = rank_dir(folder, rank) / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: DedupSignatures must complete for all {num_input_tasks} input tasks first"
            )
        manifest = json.loads(path.read_text())
        if manifest["config"] != want:
            raise ValueError(
                f"{path}: signatures were made with another dedup config ({manifest['config']}), expected {want}"
            )
        counts[rank] = manifest["n_docs"]
    return counts


def offsets_of(counts: np.ndarray) -> np.ndarray:
    """offsets[r] = gid of rank r's first doc; offsets[-1] = total."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def read_key_column(folder: str | os.PathLike, rank: int, key: str, n_docs: int) -> np.ndarray:
    if n_docs == 0:
        return np.empty(0, dtype="<u8")
    return np.memmap(rank_dir(folder, rank) / f"{key}.u64", dtype="<u8", mode="r", shape=(n_docs,))


def read_signatures32(folder: str | os.PathLike, rank: int, n_docs: int, num_hashes: int) -> np.ndarray:
    return np.memmap(rank_dir(folder, rank) / "minhash.u32", dtype="<u4", mode="r", shape=(n_docs, num_hashes))
