"""Middle stages: per-key candidate pairs (sort-based), then one clustering task (numpy union-find).

Stage A, ``FindDuplicatePairs``: one task per (key, hash-range slice). A key is the content hash, the URL hash or
one MinHash band. The task reads that key's column of every input rank in chunks, keeps the hashes that fall in
its slice, sorts them (a stable ``argsort``; ties stay in gid order) and emits, for every run of equal hashes,
the pairs (first gid of the run, other gid). For MinHash bands, pairs can be verified against the full
signatures (``MinhashConfig.verify_threshold``). Memory: one key's slice of hashes plus its pairs.

Stage B, ``ClusterDuplicates``: a single task that merges the pair files one at a time into a forest over the
documents that have a duplicate (so its memory grows with the number of duplicated documents, never with the
corpus size, and never holds more than one pair file besides the forest) and writes, per input rank, the sorted
indices to drop with their reason and the (rank, index) of the kept document. The keep rule is: in every
connected component of the duplicate graph, the document with the smallest (rank, index) is kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from kiln.config import validate_tree

from .config import DedupConfig
from .storage import (
    REASON_CODES,
    REMOVE_DTYPE,
    atomic_save_npy,
    atomic_write_json,
    keys_for,
    kind_of,
    load_manifests,
    offsets_of,
    read_key_column,
    read_signatures32,
)

_CHUNK = 1 << 22  # hashes read at a time from a rank's column (32 MiB)
_VERIFY_CHUNK = 1 << 15  # candidate pairs verified at a time
_MAX_VERIFY_ROUNDS = 16


def _hash_range(worker: int, workers: int) -> tuple[int, int]:
    """[lo, hi) slice of the uint64 hash space for one worker (band hashes are uniform over it)."""
    lo = (worker << 64) // workers
    hi = ((worker + 1) << 64) // workers
    return lo, hi


def pairs_from_sorted(hashes: np.ndarray, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For hashes sorted ascending (ties in gid order): run heads, and (head gid, member gid) for each non-head.

    Returns (heads, members, run_id_of_member) where heads/members are gids.
    """
    if len(hashes) < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    same = hashes[1:] == hashes[:-1]
    is_member = np.concatenate(([False], same))
    run_id = np.cumsum(~is_member) - 1
    head_pos = np.flatnonzero(~is_member)
    member_pos = np.flatnonzero(is_member)
    heads = gids[head_pos[run_id[member_pos]]]
    return heads, gids[member_pos], run_id[member_pos]


def union_find(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges (u, v): (nodes sorted, min node of each node's component).

    Min-label hooking with pointer jumping, all in numpy: every round hooks each root that has an edge to a
    smaller root onto the smallest such root, then compresses paths fully. The roots left after a round are
    local minima of the root graph, so there are at most log2(n) rounds.
    """
    if len(u) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    nodes, inv = np.unique(np.concatenate((u, v)), return_inverse=True)
    cu, cv = inv[: len(u)], inv[len(u) :]
    parent = np.arange(len(nodes), dtype=np.int64)
    while len(cu):
        pu, pv = parent[cu], parent[cv]
        lo, hi = np.minimum(pu, pv), np.maximum(pu, pv)
        active = lo != hi
        if not active.any():
            break
        cu, cv, lo, hi = cu[active], cv[active], lo[active], hi[active]
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return nodes, nodes[parent]


class _DedupStage(PipelineStep):
    """What both middle stages are built from: the config, the signatures folder and the key layout."""

    type = "🫂 - DEDUP"

    def __init__(self, cfg: DedupConfig, folder: str | os.PathLike, num_input_tasks: int):
        super().__init__()
        validate_tree(cfg)  # DedupConfig and its minhash section, each once
        self.cfg = cfg
        self.folder = os.fspath(folder)
        self.num_input_tasks = num_input_tasks
        self.keys = keys_for(cfg)
        self.workers = cfg.minhash.workers_per_bucket if cfg.minhash is not None else 1


class FindDuplicatePairs(_DedupStage):
    """Stage A: candidate duplicate pairs for one key (exact / url / MinHash band) and one hash-range slice."""

    name = "🔗 dedup pairs"

    @property
    def num_tasks(self) -> int:
        return len(self.keys) * self.workers

    def load_slice(self, key: str, lo: int, hi: int, counts: np.ndarray, offsets: np.ndarray):
        """(hashes, gids) of this key's non-zero hashes in [lo, hi), over all input ranks, gids ascending."""
        hash_parts, gid_parts = [], []
        lo_u, hi_u = np.uint64(lo), np.uint64(hi - 1)  # hi may be 2**64: compare inclusively with hi - 1
        for rank, n in enumerate(counts):
            col = read_key_column(self.folder, rank, key, int(n))
            for c0 in range(0, len(col), _CHUNK):
                chunk = np.asarray(col[c0 : c0 + _CHUNK])
                keep = (chunk != 0) & (chunk >= lo_u) & (chunk <= hi_u)
                idx = np.flatnonzero(keep)
                hash_parts.append(chunk[idx])
                gid_parts.append(idx + (offsets[rank] + c0))
            del col
        if not hash_parts:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        return np.concatenate(hash_parts), np.concatenate(gid_parts)

    def verify(
        self,
        band: int,
        heads: np.ndarray,
        members: np.ndarray,
        run_ids: np.ndarray,
        offsets: np.ndarray,
        counts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keep pairs whose estimated Jaccard >= verify_threshold.

        The estimate is the fraction of equal min-hashes outside ``band``: every pair found here collides on all
        of that band's rows by construction, so counting them would bias the estimate up (a J = 0.65 pair that
        collided in one band would pass a 0.7 threshold ~28% of the time instead of ~14%).

        A member that fails against its run's head is retried against the first failed member of its run (the
        next head), up to ``_MAX_VERIFY_ROUNDS`` rounds, so that a run {A, B, C} with B ~ C but A !~ B still
        yields B - C.
        """
        mh = self.cfg.minhash
        k = mh.num_hashes
        others = np.ones(k, dtype=bool)
        if mh.buckets > 1:
            others[band * mh.hashes_per_bucket : (band + 1) * mh.hashes_per_bucket] = False
        sig_cache = {}

        def sigs_of(gids: np.ndarray) -> np.ndarray:
            out = np.empty((len(gids), k), dtype=np.uint32)
            ranks = np.searchsorted(offsets, gids, side="right") - 1
            for r in np.flatnonzero(np.bincount(ranks)).tolist():
                if r not in sig_cache:
                    sig_cache[r] = read_signatures32(self.folder, r, int(counts[r]), k)
                sel = ranks == r
                out[sel] = sig_cache[r][gids[sel] - offsets[r]]
            return out

        kept_h, kept_m = [], []
        for _ in range(_MAX_VERIFY_ROUNDS):
            if not len(members):
                break
            ok = np.empty(len(members), dtype=bool)
            for c0 in range(0, len(members), _VERIFY_CHUNK):
                sl = slice(c0, c0 + _VERIFY_CHUNK)
                est = (sigs_of(heads[sl])[:, others] == sigs_of(members[sl])[:, others]).mean(axis=1)
                ok[sl] = est >= mh.verify_threshold
            kept_h.append(heads[ok])
            kept_m.append(members[ok])
            self.stat_update("minhash_pairs_rejected", value=int((~ok).sum()))
            # failed members: in each run, the first becomes the head of the others
            members, run_ids = members[~ok], run_ids[~ok]
            if not len(members):
                break
            new_run = np.concatenate(([True], run_ids[1:] != run_ids[:-1]))
            head_of = members[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
            heads, members, run_ids = head_of[~new_run], members[~new_run], run_ids[~new_run]
        else:
            if len(members):  # rounds exhausted: these members stay unpaired in this band
                self.stat_update("minhash_pairs_unverified", value=len(members))
        if not kept_h:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(kept_h), np.concatenate(kept_m)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        if world_size != self.num_tasks:
            raise ValueError(f"FindDuplicatePairs must run with {self.num_tasks} tasks, got {world_size}")
        key = self.keys[rank // self.workers]
        worker = rank % self.workers
        with self.track_time():
            counts = load_manifests(self.folder, self.num_input_tasks, self.cfg)
            offsets = offsets_of(counts)
            hashes, gids = self.load_slice(key, *_hash_range(worker, self.workers), counts, offsets)
            order = np.argsort(hashes, kind="stable")
            heads, members, run_ids = pairs_from_sorted(hashes[order], gids[order])
            del hashes, gids, order
            self.stat_update("candidate_pairs", value=len(members))
            if kind_of(key) == "minhash" and self.cfg.minhash.verify_threshold is not None and len(members):
                heads, members = self.verify(int(key.split("_")[1]), heads, members, run_ids, offsets, counts)
            self.stat_update("pairs", value=len(members))
            pairs = np.stack((heads, members), axis=1).astype(np.int64, copy=False)
            atomic_save_npy(Path(self.folder) / "pairs" / key / f"{worker:03d}.npy", pairs)
            logger.info(f"dedup key {key} slice {worker}/{self.workers}: {len(members)} pairs")


class ClusterDuplicates(_DedupStage):
    """Stage B (one task): union exact, URL and MinHash pairs; write per-rank removal lists with reasons.

    Reason precedence exact > url > minhash: a dropped document is an ``exact_duplicate`` if its component under
    exact pairs alone has a smaller document, else a ``url_duplicate`` if its component under exact + URL pairs
    does, else a ``minhash_duplicate``. Whatever the reason, ``keep`` is the smallest (rank, index) of its
    component under all pairs, which is the one document of that component that is not dropped.
    """

    name = "🧩 dedup clusters"

    def _pair_files(self, kind: str) -> list[Path]:
        files = []
        for key in self.keys:
            if kind_of(key) != kind:
                continue
            for worker in range(self.workers):
                path = Path(self.folder) / "pairs" / key / f"{worker:03d}.npy"
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: the FindDuplicatePairs stage did not complete")
                files.append(path)
        return files

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        if world_size != 1:
            raise ValueError(f"ClusterDuplicates must run as a single task, got {world_size}")
        with self.track_time():
            counts = load_manifests(self.folder, self.num_input_tasks, self.cfg)
            offsets = offsets_of(counts)
            empty = np.empty(0, dtype=np.int64)
            nodes, labels = empty, empty
            snapshots = {}
            for kind in ("exact", "url", "minhash"):
                for path in self._pair_files(kind):
                    pairs = np.load(path)
                    self.stat_update(f"{kind}_pairs", value=len(pairs))
                    if not len(pairs):
                        continue
                    tree = nodes != labels  # roots carry no edge; they reappear as labels of their members
                    nodes, labels = union_find(
                        np.concatenate((nodes[tree], pairs[:, 0])), np.concatenate((labels[tree], pairs[:, 1]))
                    )
                    del pairs
                snapshots[kind] = (nodes, labels)

            dropped = nodes[labels != nodes]
            keep = labels[labels != nodes]
            reason = np.full(len(dropped), REASON_CODES["minhash_duplicate"], dtype=np.uint8)
            # apply in reverse precedence so that exact overrides url overrides minhash
            for kind in ("url", "exact"):
                k_nodes, k_labels = snapshots[kind]
                pos = np.clip(np.searchsorted(k_nodes, dropped), 0, max(len(k_nodes) - 1, 0))
                if len(k_nodes):
                    hit = (k_nodes[pos] == dropped) & (k_labels[pos] != dropped)
                    reason[hit] = REASON_CODES[f"{kind}_duplicate"]

            drop_rank = np.searchsorted(offsets, dropped, side="right") - 1
            keep_rank = np.searchsorted(offsets, keep, side="right") - 1
            for r in range(self.num_input_tasks):
                sel = drop_rank == r
                out = np.empty(int(sel.sum()), dtype=REMOVE_DTYPE)
                out["index"] = dropped[sel] - offsets[r]
                out["reason"] = reason[sel]
                out["keep_rank"] = keep_rank[sel]
                out["keep_index"] = keep[sel] - offsets[keep_rank[sel]]
                atomic_save_npy(Path(self.folder) / "remove" / f"{r:05d}.npy", out)

            summary = {"documents": int(offsets[-1]), "clusters": int(len(np.unique(keep))), "to_remove": 0}
            for code, name in ((1, "exact_duplicate"), (2, "url_duplicate"), (3, "minhash_duplicate")):
                n = int((reason == code).sum())
                summary[name] = n
                summary["to_remove"] += n
                self.stat_update(name, value=n)
            self.stat_update("clusters", value=summary["clusters"])
            atomic_write_json(Path(self.folder) / "summary.json", summary)
            logger.info(f"dedup clustering: {summary}")


def find_duplicate_stages(
    cfg: DedupConfig, folder: str | os.PathLike, num_input_tasks: int
) -> list[tuple[list[PipelineStep], int]]:
    """The middle stages, each ``(pipeline, tasks)``, to run in order with any datatrove executor."""
    pairs_step = FindDuplicatePairs(cfg, folder, num_input_tasks)
    return [([pairs_step], pairs_step.num_tasks), ([ClusterDuplicates(cfg, folder, num_input_tasks)], 1)]
