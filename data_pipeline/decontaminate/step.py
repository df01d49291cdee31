"""The decontamination step, a datatrove ``PipelineStep``.

Not a datatrove ``BaseFilter``: under the split policy one input document becomes several output documents,
which a filter (keep or drop) cannot express. It counts like one, so accounting reads it the same way:
``total`` (documents in), ``forwarded`` (documents out: unchanged ones plus pieces), ``dropped`` and
``dropped_<reason>``; and, for the split policy, ``documents_split`` (input documents replaced by their pieces) and
``pieces_created`` (pieces out), so that ``input + pieces_created - documents_split = kept + dropped + rejected``.
Informational: ``contaminated_documents``, ``pieces_too_short`` (pieces discarded for length).

The index is built (or loaded from the cache) in the constructor, i.e. when the pipeline is built and before any
task starts, so an unreadable eval set fails there; tasks memory-map the cached index.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.typeshelper import StatHints

from kiln.config import ConfigError, validate_tree
from kiln.data_pipeline.decontaminate.config import DecontaminateConfig, EvalSetConfig
from kiln.data_pipeline.decontaminate.index import (
    NORMALISATION_VERSION,
    EvalIndex,
    fingerprint,
    hash_words,
    load_or_build,
    ngram_hashes,
    normalized_words,
    word_spans,
)
from kiln.data_pipeline.decontaminate.summary import overlap_path, run_work_dir


def contaminated_pieces(
    text: str, ngram_starts: Sequence[int], ngram_ends: Sequence[int], margin: int
) -> list[tuple[int, int]]:
    """The [start, end) segments of ``text`` left after cutting out each span [ngram_starts[i], ngram_ends[i])
    widened by ``margin`` characters either side; only segments with a non-whitespace character are pieces."""
    cuts: list[list[int]] = []
    for s, e in sorted(zip(ngram_starts, ngram_ends)):
        a, b = max(0, s - margin), min(len(text), e + margin)
        if cuts and a <= cuts[-1][1]:
            cuts[-1][1] = max(cuts[-1][1], b)
        else:
            cuts.append([a, b])
    pieces, pos = [], 0
    for a, b in [*cuts, [len(text), len(text)]]:
        if a > pos and text[pos:a].strip():
            pieces.append((pos, a))
        pos = b
    return pieces


class DecontaminateStep(PipelineStep):
    """Drops (policy ``drop``) or cuts up (policy ``split``) documents sharing a word n-gram with an eval set.

    Args:
        eval_sets: ``EvalSetConfig`` (or mappings ``{path, text_key?, name?}``), checked here.
        ngram, policy, margin_chars, min_piece_chars, max_pieces: see ``DecontaminateConfig``.
        exclusion_writer: receives dropped documents with ``metadata["filter_reason"]`` and
            ``metadata["decontaminate_sets"]`` (the names of the sets they overlap).
        work_dir: a local folder for the index cache (``index-<fingerprint>/``) and the per-task overlap records
            (``overlap/<rank>.json``, merged by ``summary.load_summary``). Without it the index travels inside the
            pickled step and no overlap record is written (the counts are still in the stats).
    """

    name = "🧪 Decontaminate"
    type = "🔻 - FILTER"

    def __init__(
        self,
        eval_sets: Sequence[EvalSetConfig | dict],
        ngram: int = 13,
        policy: str = "drop",
        exclusion_writer: DiskWriter | None = None,
        work_dir: str | Path | None = None,
        margin_chars: int = 200,
        min_piece_chars: int = 200,
        max_pieces: int = 10,
    ):
        super().__init__()
        cfg = DecontaminateConfig(
            eval_sets=[s if isinstance(s, EvalSetConfig) else EvalSetConfig(**s) for s in eval_sets],
            ngram=ngram,
            policy=policy,
            margin_chars=margin_chars,
            min_piece_chars=min_piece_chars,
            max_pieces=max_pieces,
        )
        validate_tree(cfg)  # a step built in Python gets the recipe's checks (ConfigError, a ValueError)
        self.ngram, self.policy = ngram, policy
        self.margin_chars, self.min_piece_chars, self.max_pieces = margin_chars, min_piece_chars, max_pieces
        self.exclusion_writer = exclusion_writer
        self.eval_sets = [(s.set_name, s.path, s.text_key) for s in cfg.eval_sets]  # as written (in messages)
        self.work_dir = str(Path(work_dir).resolve()) if work_dir is not None else None
        try:  # every item of every set is read here, before any task starts
            self._index: EvalIndex | None = load_or_build(self.eval_sets, ngram, self.work_dir)
        except ValueError as e:  # phrased for the recipe's author, like the loader's errors (`kiln` exits 2)
            raise ConfigError(f"decontaminate: {e}") from None
        self.index_dir = (
            str(Path(self.work_dir) / f"index-{fingerprint(self.eval_sets, ngram)}") if self.work_dir else None
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.index_dir is not None:
            state["_index"] = None  # tasks memory-map the cached index instead of unpickling a copy
        return state

    @property
    def index(self) -> EvalIndex:
        if self._index is None:
            self._index = EvalIndex.load(self.index_dir)
        return self._index

    def hits(self, text: str) -> np.ndarray:
        """The distinct hashes of the text's n-grams that are in the index."""
        hashes = ngram_hashes(hash_words(normalized_words(text)), self.ngram)
        return np.unique(hashes[self.index.contains(hashes)])

    def pieces(self, text: str) -> list[tuple[int, int]]:
        """The segments of ``text`` left once every indexed n-gram (plus the margins) is cut out."""
        words, starts, ends = word_spans(text)
        hashes = ngram_hashes(hash_words(words), self.ngram)
        first = np.flatnonzero(self.index.contains(hashes))
        return contaminated_pieces(
            text, [starts[i] for i in first], [ends[i + self.ngram - 1] for i in first], self.margin_chars
        )

    def _drop(self, doc: Document, reason: str, writer, rank: int, sets: list[str]) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{reason}")
        if writer is not None:
            doc.metadata["filter_reason"] = reason
            doc.metadata["decontaminate_sets"] = sets
            writer.write(doc, rank)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        index = self.index
        set_documents = [0] * len(index.sets)
        set_items: list[set[int]] = [set() for _ in index.sets]
        checked = contaminated = 0
        with self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext() as writer:
            for doc in data or ():
                self.stat_update(StatHints.total)
                checked += 1
                with self.track_time():
                    hits = self.hits(doc.text)
                if not len(hits):
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                    continue
                contaminated += 1
                self.stat_update("contaminated_documents")
                located = index.locate(index.items_of(hits))
                for s, item in located:
                    set_items[s].add(item)
                touched = sorted({s for s, _ in located})
                for s in touched:
                    set_documents[s] += 1
                names = [index.sets[s].name for s in touched]
                if self.policy == "drop":
                    self._drop(doc, "contaminated", writer, rank, names)
                    continue
                with self.track_time():
                    segments = self.pieces(doc.text)
                kept = [(a, b) for a, b in segments if b - a >= self.min_piece_chars]
                if len(segments) > self.max_pieces:
                    self._drop(doc, "contaminated_too_many_pieces", writer, rank, names)
                    continue
                if len(segments) > len(kept):
                    self.stat_update("pieces_too_short", value=len(segments) - len(kept))
                if not kept:
                    self._drop(doc, "contaminated", writer, rank, names)
                    continue
                self.stat_update("documents_split")
                self.stat_update("pieces_created", value=len(kept))
                for k, (a, b) in enumerate(kept):
                    meta = dict(doc.metadata)
                    meta["decontaminate"] = {"parent_id": doc.id, "piece": k, "start": a, "end": b, "sets": names}
                    piece = Document(text=doc.text[a:b], id=f"{doc.id}/part{k}", media=list(doc.media), metadata=meta)
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(piece)
                    yield piece
        for s, info in enumerate(index.sets):
            self.stat_update(f"overlap_{info.name}", value=set_documents[s])
        if self.work_dir is not None:
            record = {
                "rank": rank,
                "world_size": world_size,
                "ngram": self.ngram,
                "policy": self.policy,
                "normalisation": NORMALISATION_VERSION,
                "documents_checked": checked,
                "contaminated_documents": contaminated,
                "sets": [
                    {
                        "name": info.name,
                        "path": info.path,
                        "text_key": info.text_key,
                        "format": info.format,
                        "items": info.items,
                        "items_too_short": info.items_too_short,
                        "indexed_items": info.indexed_items,
                        "ngrams": info.ngrams,
                        "contaminated_documents": set_documents[s],
                        "contaminated_items": sorted(set_items[s]),
                    }
                    for s, info in enumerate(index.sets)
                ],
            }
            path = overlap_path(self.work_dir, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)


def _run_work_dir_of(writer: DiskWriter | None) -> Path | None:
    """``<run>/work/decontaminate`` when ``writer`` writes to ``<run>/excluded/<step>`` on the local disk (as the
    runner's exclusion writers do); None otherwise."""
    folder = getattr(writer, "output_folder", None)
    if folder is None:
        return None
    protocol = getattr(getattr(folder, "fs", None), "protocol", None)
    protocols = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
    path = Path(folder.path)
    if not ({"file", "local"} & set(protocols)) or path.parent.name != "excluded":
        return None
    return run_work_dir(path.parent.parent)


def build_decontaminate(
    cfg: DecontaminateConfig, exclusion_writer: DiskWriter | None = None, work_dir: str | Path | None = None
) -> DecontaminateStep:
    """The step for a recipe entry. In a `kiln data run` the exclusion writer writes to ``<run>/excluded/
    decontaminate``, so the index cache and the overlap records go to ``<run>/work/decontaminate`` and
    `kiln data stats` writes ``<run>/report/decontamination.json``."""
    return DecontaminateStep(
        cfg.eval_sets,
        ngram=cfg.ngram,
        policy=cfg.policy,
        exclusion_writer=exclusion_writer,
        work_dir=work_dir if work_dir is not None else _run_work_dir_of(exclusion_writer),
        margin_chars=cfg.margin_chars,
        min_piece_chars=cfg.min_piece_chars,
        max_pieces=cfg.max_pieces,
    )
