"""`RefineStep`: the TinyHelen refinement pipeline as one datatrove step.

Per document: pick the genre; clean (boilerplate lines, URLs/e-mails, non-ASCII noise); chunk by sentences
(`chunk_tokens`); drop chunks of `min_chars` characters or fewer and chunks already seen (hash dedup); rewrite
each chunk with the genre's prompt (cache first, then the backend, a batch at a time); accept a rewrite only
when it is longer than `min_chars` and its simplicity is >= `min_simplicity`, else keep the chunk's cleaned
original with the reason; drop final chunks already seen. The document's text becomes its final chunks joined
by newlines.

Metadata written on each output document:

- ``simplicity``: lexical simplicity of the final text (share of words in the `vocab_size_k` commonest).
- ``refine``: ``{"status", "reason", "simplicity_before", "simplicity_after", "genre", "chunks"}`` where status
  is "rewritten" (every chunk rewritten, reason "ok"), "kept_original" (none, reason of the first chunk) or
  "partial" (reason of the first chunk that kept its original); simplicity_before is that of the cleaned
  original chunks, simplicity_after that of the final text. ``chunks`` lists per chunk ``{"status", "reason",
  "simplicity_before", "simplicity_after"}`` where simplicity_after is that of the model's candidate rewrite
  (None when there was none) and reason is "ok", "rewrite_disabled", "not_simple", "too_short",
  "too_long_for_context" or "endpoint_failed: <status>".

Stats (datatrove `stat_update`): per document `total`, `forwarded`, `dropped`, `dropped_<reason>` (too_short,
duplicate, not_simple; the names the run accounting balances) and `docs_<status>`; per chunk `chunks`,
`chunks_rewritten`, `chunks_kept_original`, `chunks_kept_original_<reason>`, `chunks_dropped_<reason>`
(too_short, duplicate, duplicate_output), `chunks_cache_hits` and `llm_calls` (requests or generations).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

from .backends import RewriteBackend, RewriteResult, build_backend
from .cache import RewriteCache, cache_key
from .config import GENRES, RefineConfig
from .prompts import build_messages, system_prompt
from .rules import ChunkDeduper, approx_token_count, chunk_sentences, clean_text, strip_preamble, trim_to_last_sentence
from .simplicity import lexical_simplicity


def resolve_genre(configured: str, metadata: dict[str, Any]) -> str:
    """The configured genre, or for "auto": metadata["genre"] when valid, "wiki" for wikipedia.org URLs, else "web"."""
    if configured != "auto":
        return configured
    genre = str(metadata.get("genre", "")).lower()
    if genre in GENRES:
        return genre
    if "wikipedia.org" in str(metadata.get("url", "")):
        return "wiki"
    return "web"


def reason_key(reason: str) -> str:
    """A reason as a stat-name suffix: "endpoint_failed: http_500" -> "endpoint_failed_http_500"."""
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")


@dataclass
class _Chunk:
    original: str
    simplicity_before: float
    final: str = ""
    status: str = "kept_original"
    reason: str = "rewrite_disabled"
    simplicity_after: float | None = None


@dataclass
class _DocWork:
    doc: Document
    genre: str
    chunks: list[_Chunk] = field(default_factory=list)


class RefineStep(PipelineStep):
    name = "Refine (TinyHelen)"
    type = "REFINE"

    def __init__(
        self,
        cfg: RefineConfig,
        backend: RewriteBackend | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        """`backend` defaults to one built from `cfg.backend` when the step first runs (so the step pickles
        without a loaded model); `count_tokens` overrides the chunk token counter."""
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self._count_tokens = count_tokens

    # --- setup ---

    def _setup(self) -> tuple[RewriteBackend | None, RewriteCache | None, Callable[[str], int]]:
        cfg = self.cfg
        if self.backend is None and (cfg.enabled_rewrite or cfg.chunk_counter == "model"):
            self.backend = build_backend(cfg.backend)
        counter = self._count_tokens
        if counter is None:
            if cfg.chunk_counter == "model":
                counter = getattr(self.backend, "count_tokens", None)
                if counter is None:
                    raise ValueError("chunk_counter 'model' needs a backend with a tokenizer (the local one)")
            else:
                counter = approx_token_count
        cache = RewriteCache(cfg.cache_dir) if cfg.cache_dir and cfg.enabled_rewrite else None
        return self.backend, cache, counter

    # --- per document, before the model ---

    def _prepare(self, doc: Document, counter: Callable[[str], int], seen: ChunkDeduper) -> _DocWork | None:
        cfg = self.cfg
        genre = resolve_genre(cfg.genre, doc.metadata)
        cleaned = clean_text(doc.text, code=genre == "code")
        pieces = chunk_sentences(cleaned, cfg.chunk_tokens, counter, line_units=genre in ("code", "conversation"))
        work = _DocWork(doc, genre)
        drops: list[str] = []
        for piece in pieces:
            if len(piece) <= cfg.min_chars:
                drops.append("too_short")
            elif seen.is_duplicate(piece):
                drops.append("duplicate")
            else:
                work.chunks.append(_Chunk(piece, lexical_simplicity(piece, cfg.vocab_size_k)))
                continue
            self.stat_update("chunks", f"chunks_dropped_{drops[-1]}")
        if work.chunks:
            return work
        reason = "duplicate" if drops and all(d == "duplicate" for d in drops) else "too_short"
        self.stat_update(StatHints.dropped, f"dropped_{reason}")
        return None

    # --- a batch of documents through cache + model ---

    def _rewrite(self, batch: list[_DocWork], backend: RewriteBackend, cache: RewriteCache | None) -> None:
        cfg = self.cfg
        todo: list[tuple[_Chunk, str, list[dict[str, str]]]] = []
        for work in batch:
            prompt = system_prompt(work.genre, cfg.vocab_size_k)
            for chunk in work.chunks:
                key = cache_key(backend.model_id, prompt, chunk.original)
                hit = cache.get(key) if cache else None
                if hit is not None and (hit[2] is None or not cfg.retry_failed):
                    self.stat_update("chunks_cache_hits" if hit[2] is None else "chunks_cached_failures")
                    self._judge(chunk, RewriteResult(hit[0], error=hit[2], truncated=hit[1]))
                else:
                    todo.append((chunk, key, build_messages(work.genre, chunk.original, cfg.vocab_size_k)))
        results = backend.rewrite_batch([messages for _, _, messages in todo])
        for (chunk, key, _), result in zip(todo, results, strict=True):
            self.stat_update("llm_calls", value=result.attempts)
            if cache is not None and (result.error is not None or result.text is not None):
                cache.put(key, backend.model_id, result.text, result.truncated, error=result.error)
            self._judge(chunk, result)

    def _judge(self, chunk: _Chunk, result: RewriteResult) -> None:
        """Accept the rewrite or keep the original, recording why."""
        cfg = self.cfg
        if result.error is not None or result.text is None:
            chunk.reason = result.error or "no_output"
            return
        candidate = clean_text(strip_preamble(result.text))
        if result.truncated:
            candidate = trim_to_last_sentence(candidate)
        chunk.simplicity_after = lexical_simplicity(candidate, cfg.vocab_size_k)
        if len(candidate) <= cfg.min_chars:
            chunk.reason = "too_short"
        elif chunk.simplicity_after < cfg.min_simplicity:
            chunk.reason = "not_simple"
        else:
            chunk.status, chunk.reason, chunk.final = "rewritten", "ok", candidate

    # --- assembling the output document ---

    def _finish(self, work: _DocWork, seen_outputs: ChunkDeduper) -> Document | None:
        cfg = self.cfg
        kept: list[_Chunk] = []
        for chunk in work.chunks:
            if chunk.status != "rewritten":
                chunk.final = chunk.original
            self.stat_update("chunks")
            if seen_outputs.is_duplicate(chunk.final):
                self.stat_update("chunks_dropped_duplicate_output")
                continue
            self.stat_update(f"chunks_{chunk.status}")
            if chunk.status == "kept_original":
                self.stat_update(f"chunks_kept_original_{reason_key(chunk.reason)}")
            kept.append(chunk)
        if not kept:
            self.stat_update(StatHints.dropped, "dropped_duplicate")
            return None
        doc = work.doc
        text = "\n".join(c.final for c in kept)
        rewritten = sum(c.status == "rewritten" for c in kept)
        status = "rewritten" if rewritten == len(kept) else "kept_original" if rewritten == 0 else "partial"
        reason = next((c.reason for c in kept if c.status != "rewritten"), "ok")
        simplicity = lexical_simplicity(text, cfg.vocab_size_k)
        doc.text = text
        doc.metadata["simplicity"] = simplicity
        doc.metadata["refine"] = {
            "status": status,
            "reason": reason,
            "simplicity_before": lexical_simplicity("\n".join(c.original for c in kept), cfg.vocab_size_k),
            "simplicity_after": simplicity,
            "genre": work.genre,
            "chunks": [
                {
                    "status": c.status,
                    "reason": c.reason,
                    "simplicity_before": c.simplicity_before,
                    "simplicity_after": c.simplicity_after,
                }
                for c in kept
            ],
        }
        if cfg.drop_below_min_simplicity and simplicity < cfg.min_simplicity:
            self.stat_update(StatHints.dropped, "dropped_not_simple")
            return None
        self.stat_update(StatHints.forwarded, f"docs_{status}")
        if status != "rewritten":
            self.stat_update(f"docs_{status}_{reason_key(reason)}")
        return doc

    def _flush(
        self, batch: list[_DocWork], backend: RewriteBackend | None, cache: RewriteCache | None, seen: ChunkDeduper
    ) -> DocumentsPipeline:
        if self.cfg.enabled_rewrite and backend is not None:
            with self.track_time(unit="batch"):
                self._rewrite(batch, backend, cache)
        for work in batch:
            doc = self._finish(work, seen)
            if doc is not None:
                yield doc

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        backend, cache, counter = self._setup()
        seen_inputs, seen_outputs = ChunkDeduper(), ChunkDeduper()
        batch: list[_DocWork] = []
        pending_chunks = 0
        for doc in data:
            self.stat_update(StatHints.total)
            work = self._prepare(doc, counter, seen_inputs)
            if work is None:
                continue
            batch.append(work)
            pending_chunks += len(work.chunks)
            if pending_chunks >= self.cfg.batch_size:
                yield from self._flush(batch, backend, cache, seen_outputs)
                batch, pending_chunks = [], 0
        if batch:
            yield from self._flush(batch, backend, cache, seen_outputs)
