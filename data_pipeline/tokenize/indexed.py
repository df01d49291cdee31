"""Tokenize documents into megatron-core indexed datasets (the trainer's on-disk format).

On-disk layout for a dataset prefix ``P`` (``P`` is what the trainer is given):

- ``P.bin`` / ``P.idx``: tokens, written with megatron-core's ``IndexedDatasetBuilder``. One document = one
  sequence = one megatron document: ``[BOS] + (metadata prefix) + text + [EOS]``. Token dtype is megatron's
  ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, else int32). Document boundaries are the idx's
  sequence lengths / document indices; megatron's ``GPTDataset`` reads it as is.
- ``P_loss_mask.bin`` / ``P_loss_mask.idx``: a parallel indexed dataset (uint8) with exactly the same sequence
  lengths, so ``IndexedDataset(P + "_loss_mask").get(i, offset, length)`` returns the mask for the very tokens
  ``IndexedDataset(P).get(i, offset, length)`` returns. ``mask[t] = 1`` iff token ``t`` is a prediction target
  (the trainer uses ``mask[1:]`` with ``labels = tokens[1:]``). We chose a dense parallel dataset over
  datatrove's ``.ds.loss`` sidecar because it reuses megatron's reader, sampling and sharding unchanged, and
  costs one byte per token. BOS is never a target (mask 0). In MeCo data the metadata prefix tokens are 0 too.
  Character ranges in ``doc.metadata["no_loss_ranges"]`` (datatrove's convention, ``[(start, end), ...]``)
  are 0 as well; unlike datatrove we do not crop a trailing no-loss range, so every document decodes back to
  its full text.
- ``P.meta.json``: format, tokenizer (path, kind, vocab_size, fingerprint, special ids), counts (documents,
  tokens, loss tokens) and what the variant is; `check_tokenizer_matches` reads it.

Exactness: the metadata prefix, the text, and each side of a ``no_loss_ranges`` cut are encoded as separate
segments and concatenated, so a mask boundary always falls between tokens, and the text tokens of a document
are identical in the ``_meco`` and ``_plain`` variants.

MeCo: with ``meco=True`` the corpus is written twice from one tokenization pass: ``<prefix>_meco`` (with the
prefix from `kiln.data_pipeline.metadata.AddMetadata`) and ``<prefix>_plain`` (without), so the trainer switches
datasets for the cooldown. Without MeCo a single dataset ``<prefix>`` is written.

Parallelism: `TokenizeToIndexed` is a datatrove step; rank ``r`` writes the shard ``<prefix>_<r:05d>`` (plus
variant suffixes). `merge_shards` (or the `MergeIndexedShards` step, run as a 1-task stage afterwards)
concatenates the shards with megatron's ``IndexedDatasetBuilder.add_index`` in rank order; or pass
`list_shards(...)` to megatron's blend directly. Documents keep their input order (megatron's ``GPTDataset``
shuffles with its own seed). Paths are local files (megatron's builder writes with ``open``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.batching import batched

from kiln.data_pipeline.metadata import META_PREFIX_KEY
from kiln.data_pipeline.tokenize.tokenizer import TokenizeError, Tokenizer, load_tokenizer
from kiln.data_pipeline.tokenize.train import EmptyCorpusError

FORMAT = "kiln-indexed-v1"
LOSS_MASK_SUFFIX = "_loss_mask"
META_SUFFIX = ".meta.json"
MECO_VARIANTS = ("meco", "plain")


class TokenizerMismatchError(TokenizeError):
    """The tokenizer given to the trainer is not the one the dataset was tokenized with."""


def dataset_prefix(prefix: str | os.PathLike, variant: str | None) -> str:
    """``out/web`` + ``"meco"`` -> ``out/web_meco``; variant None -> the prefix itself."""
    return f"{prefix}_{variant}" if variant else str(prefix)


def shard_prefix(prefix: str | os.PathLike, rank: int) -> str:
    return f"{prefix}_{rank:05d}"


def loss_mask_prefix(prefix: str | os.PathLike) -> str:
    return f"{prefix}{LOSS_MASK_SUFFIX}"


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def read_meta(prefix: str | os.PathLike) -> dict:
    path = meta_path(prefix)
    if not path.is_file():
        hint = ""
        if Path(f"{prefix}_meco{META_SUFFIX}").is_file():
            hint = f" (this is MeCo data: use {prefix}_meco or {prefix}_plain)"
        elif (
            Path(f"{shard_prefix(prefix, 0)}{META_SUFFIX}").is_file()
            or Path(f"{shard_prefix(prefix, 0)}_meco{META_SUFFIX}").is_file()
        ):
            hint = " (its shards exist but were not merged: run merge_shards or `kiln data tokenize` again)"
        raise TokenizeError(f"{path} not found: {prefix} is not a tokenized dataset written by kiln{hint}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise TokenizeError(f"{path}: invalid JSON ({e})") from None


def _write_meta(prefix: str | os.PathLike, meta: dict) -> None:
    path = meta_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def _megatron():
    """megatron-core's indexed dataset module (imported lazily: importing megatron.core takes seconds)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" on CPU machines
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type[np.number]:
    return _megatron().DType.optimal_dtype(vocab_size)


class _DatasetWriter:
    """Tokens + loss mask for one dataset prefix, through megatron-core's ``IndexedDatasetBuilder``."""

    def __init__(self, prefix: str, dtype: type[np.number]):
        idx = _megatron()
        self.prefix = prefix
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tokens = idx.IndexedDatasetBuilder(idx.get_bin_path(prefix), dtype=dtype)
        self.mask = idx.IndexedDatasetBuilder(idx.get_bin_path(loss_mask_prefix(prefix)), dtype=np.uint8)
        self.documents = 0
        self.num_tokens = 0
        self.loss_tokens = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        self.tokens.add_document(tokens, [tokens.size])
        self.mask.add_document(mask, [mask.size])
        self.documents += 1
        self.num_tokens += tokens.size
        self.loss_tokens += int(mask.sum())

    def finalize(self) -> None:
        idx = _megatron()
        for builder, prefix in ((self.tokens, self.prefix), (self.mask, loss_mask_prefix(self.prefix))):
            if self.documents:
                builder.finalize(idx.get_idx_path(prefix))
            else:  # megatron cannot mmap an empty .bin: an empty shard is recorded in its meta.json only
                builder.data_file.close()
                _remove(idx.get_bin_path(prefix), idx.get_idx_path(prefix))


def _remove(*paths: str | os.PathLike) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


class TokenizeToIndexed(PipelineStep):
    """Tokenize documents into megatron-core indexed datasets; rank r writes shard ``<output_prefix>_<r:05d>``.

    Args:
        output_prefix: path prefix of the output (``out/web`` -> ``out/web_00000.bin`` ... before merging).
        tokenizer: a `Tokenizer` or anything `load_tokenizer` accepts.
        meco: write ``_meco`` (with ``doc.metadata[metadata_key]`` prepended, masked) and ``_plain`` variants.
        metadata_key: where `AddMetadata` stored the prefix.
        batch_size: documents encoded per call (sentencepiece encodes a list in one C++ call).
        num_threads: sentencepiece encoding threads per task.
        use_no_loss_ranges: honour ``doc.metadata["no_loss_ranges"]`` (character ranges with mask 0).

    Documents pass through unchanged. Stats: ``documents`` (written), ``skipped_empty_text``, ``tokens`` and
    ``loss_tokens`` (without metadata prefixes), ``meco_no_prefix`` (MeCo documents written without a prefix).
    """

    name = "🔢 Tokenize to indexed"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        output_prefix: str | os.PathLike,
        tokenizer: str | os.PathLike | Tokenizer,
        meco: bool = False,
        metadata_key: str = META_PREFIX_KEY,
        batch_size: int = 1000,
        num_threads: int = 1,
        use_no_loss_ranges: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise TokenizeError(f"batch_size must be >= 1, got {batch_size}")
        self.output_prefix = str(output_prefix)
        self.tokenizer_ref = tokenizer if isinstance(tokenizer, Tokenizer) else str(tokenizer)
        self.meco = meco
        self.metadata_key = metadata_key
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.use_no_loss_ranges = use_no_loss_ranges

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tok = load_tokenizer(self.tokenizer_ref)
        dtype = token_dtype(tok.vocab_size)
        shard = shard_prefix(self.output_prefix, rank)
        variants = MECO_VARIANTS if self.meco else (None,)
        writers = {v: _DatasetWriter(dataset_prefix(shard, v), dtype) for v in variants}
        no_prefix = 0
        for batch in batched(data or (), self.batch_size):
            with self.track_time(unit="batch"):
                no_prefix += self._write_batch(batch, tok, dtype, writers)
            yield from batch
        for variant, writer in writers.items():
            writer.finalize()
            meta = {
                "format": FORMAT,
                "variant": variant or "text",
                "tokenizer": tok.describe(),
                "token_dtype": np.dtype(dtype).name,
                "loss_mask": loss_mask_prefix(Path(writer.prefix).name),
                "documents": writer.documents,
                "tokens": writer.num_tokens,
                "loss_tokens": writer.loss_tokens,
                "documents_without_metadata": no_prefix if variant == "meco" else None,
                "shard": {"rank": rank, "world_size": world_size},
            }
            _write_meta(writer.prefix, meta)

    def _write_batch(self, batch: list[Document], tok: Tokenizer, dtype, writers: dict) -> int:
        """Encode a batch with one tokenizer call and write every variant; returns docs lacking a MeCo prefix."""
        segments: list[str] = []
        plans = []  # per document: (doc, prefix segment index or None, [(segment index, loss flag), ...])
        for doc in batch:
            if not doc.text:
                self.stat_update("skipped_empty_text")
                continue
            prefix_at = None
            if self.meco:
                prefix = doc.metadata.get(self.metadata_key)
                if prefix:
                    prefix_at = len(segments)
                    segments.append(prefix)
            pieces = []
            for text, loss in self._text_segments(doc):
                pieces.append((len(segments), loss))
                segments.append(text)
            plans.append((prefix_at, pieces))
        encoded = tok.encode_batch(segments, num_threads=self.num_threads)
        bos, eos = tok.bos_id, tok.eos_id
        no_prefix = 0
        for prefix_at, pieces in plans:
            if len(pieces) == 1:
                text_ids = encoded[pieces[0][0]]
                body = np.array([bos, *text_ids, eos], dtype=dtype)
                body_mask = np.ones(body.size, dtype=np.uint8)
            else:
                ids, flags = [bos], [0]
                for at, loss in pieces:
                    ids.extend(encoded[at])
                    flags.extend([loss] * len(encoded[at]))
                ids.append(eos)
                flags.append(1)
                body = np.array(ids, dtype=dtype)
                body_mask = np.array(flags, dtype=np.uint8)
            body_mask[0] = 0  # BOS is never a target
            for variant, writer in writers.items():
                if variant == "meco" and prefix_at is not None and encoded[prefix_at]:
                    prefix_ids = np.asarray(encoded[prefix_at], dtype=dtype)
                    tokens = np.concatenate((body[:1], prefix_ids, body[1:]))
                    mask = np.concatenate((np.zeros(1 + prefix_ids.size, dtype=np.uint8), body_mask[1:]))
                    writer.add(tokens, mask)
                else:
                    writer.add(body, body_mask)
            if self.meco and prefix_at is None:
                no_prefix += 1
                self.stat_update("meco_no_prefix")
            self.stat_update("documents")
            self.stat_update("tokens", value=body.size)  # without the metadata prefix
            self.stat_update("loss_tokens", value=int(body_mask.sum()))
        return no_prefix

    def _text_segments(self, doc: Document) -> list[tuple[str, int]]:
        text = doc.text
        ranges = doc.metadata.get("no_loss_ranges") if self.use_no_loss_ranges else None
        if not ranges:
            return [(text, 1)]
        cuts, out, pos = sorted((max(0, int(s)), min(len(text), int(e))) for s, e in ranges), [], 0
        for start, end in cuts:
            start = max(start, pos)
            if end <= start:
                continue
            if start > pos:
                out.append((text[pos:start], 1))
            out.append((text[start:end], 0))
            pos = end
        if pos < len(text):
            out.append((text[pos:], 1))
        return out


# ----------------------------------------------------------------------------------------------- shards


def list_shards(output_prefix: str | os.PathLike, variant: str | None = None) -> list[str]:
    """The non-empty shard prefixes of one variant, in rank order (what megatron's blend can take directly).

    Raises `TokenizeError` when a shard of the run is missing and `EmptyCorpusError` when all are empty."""
    metas = _shard_metas(output_prefix, variant)
    shards = [prefix for prefix, meta in metas if meta["documents"] > 0]
    if not shards:
        raise EmptyCorpusError(
            f"{dataset_prefix(output_prefix, variant)}: the corpus is empty: no documents with text were "
            f"tokenized ({len(metas)} shard(s), all empty). Check the input paths and the text key."
        )
    return shards


def _shard_metas(output_prefix, variant) -> list[tuple[str, dict]]:
    first = dataset_prefix(shard_prefix(output_prefix, 0), variant)
    if not meta_path(first).is_file():
        raise TokenizeError(f"no tokenized shards at {output_prefix} (expected {meta_path(first)})")
    world_size = read_meta(first)["shard"]["world_size"]
    metas = []
    for rank in range(world_size):
        prefix = dataset_prefix(shard_prefix(output_prefix, rank), variant)
        if not meta_path(prefix).is_file():
            raise TokenizeError(f"shard {rank} of {world_size} missing ({meta_path(prefix)}): did task {rank} finish?")
        metas.append((prefix, read_meta(prefix)))
    return metas


def shard_variants(output_prefix: str | os.PathLike) -> tuple[str | None, ...]:
    """Which variants the shards at ``output_prefix`` hold: ("meco", "plain") or (None,)."""
    if meta_path(dataset_prefix(shard_prefix(output_prefix, 0), "meco")).is_file():
        return MECO_VARIANTS
    return (None,)


def merge_shards(output_prefix: str | os.PathLike, remove_shards: bool = True) -> list[str]:
    """Concatenate every rank's shard into ``<output_prefix>`` (or ``_meco`` and ``_plain``), in rank order.

    Returns the dataset prefixes written. Raises `EmptyCorpusError` when no shard holds a document (nothing
    is written then). The merged ``.meta.json`` is written last, so its presence means the merge finished."""
    idx = _megatron()
    written = []
    for variant in shard_variants(output_prefix):
        metas = _shard_metas(output_prefix, variant)
        fingerprints = {m["tokenizer"]["fingerprint"] for _, m in metas}
        if len(fingerprints) > 1:
            raise TokenizerMismatchError(f"{output_prefix}: shards were tokenized with different tokenizers")
        shards = list_shards(output_prefix, variant)
        target = dataset_prefix(output_prefix, variant)
        first = metas[0][1]
        dtype = getattr(np, first["token_dtype"])
        for src_suffix, builder_dtype in (("", dtype), (LOSS_MASK_SUFFIX, np.uint8)):
            out = target + src_suffix
            if len(shards) == 1 and remove_shards:  # one shard: a rename, no copy (and no gc.collect per shard)
                os.replace(idx.get_bin_path(shards[0] + src_suffix), idx.get_bin_path(out))
                os.replace(idx.get_idx_path(shards[0] + src_suffix), idx.get_idx_path(out))
                continue
            builder = idx.IndexedDatasetBuilder(idx.get_bin_path(out), dtype=builder_dtype)
            for shard in shards:
                builder.add_index(shard + src_suffix)
            builder.finalize(idx.get_idx_path(out))
        meta = dict(first)
        meta.pop("shard")
        meta["loss_mask"] = loss_mask_prefix(Path(target).name)
        for key in ("documents", "tokens", "loss_tokens"):
            meta[key] = sum(m[key] for _, m in metas)
        if variant == "meco":
            meta["documents_without_metadata"] = sum(m["documents_without_metadata"] for _, m in metas)
        meta["merged_from_shards"] = len(metas)
        _write_meta(target, meta)
        written.append(target)
        if remove_shards:
            for prefix, _ in metas:
                for p in (prefix, loss_mask_prefix(prefix)):
                    _remove(idx.get_bin_path(p), idx.get_idx_path(p))
                _remove(meta_path(prefix))
    return written


class MergeIndexedShards(PipelineStep):
    """Run `merge_shards` once (rank 0) as a 1-task stage after the `TokenizeToIndexed` stage."""

    name = "🔗 Merge indexed shards"
    type = "🔢 - TOKENIZER"

    def __init__(self, output_prefix: str | os.PathLike, remove_shards: bool = True):
        super().__init__()
        self.output_prefix = str(output_prefix)
        self.remove_shards = remove_shards

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if rank == 0:
            for prefix in merge_shards(self.output_prefix, self.remove_shards):
                self.stat_update("documents", value=read_meta(prefix)["documents"])


# ------------------------------------------------------------------------------------- trainer checks


def check_tokenizer_matches(dataset_prefix: str | os.PathLike, tokenizer: str | os.PathLike | Tokenizer) -> dict:
    """Fail early, with a clear message, when ``tokenizer`` is missing or is not the dataset's tokenizer.

    Checks the dataset's ``.meta.json`` (and that its ``.bin``/``.idx`` exist), then the tokenizer's vocabulary
    size and fingerprint. Returns the dataset's meta dict."""
    meta = read_meta(dataset_prefix)
    for suffix in (".bin", ".idx"):
        if not Path(f"{dataset_prefix}{suffix}").is_file():
            raise TokenizeError(f"{dataset_prefix}{suffix} not found (the dataset's meta.json exists)")
    want = meta["tokenizer"]
    tok = load_tokenizer(tokenizer)
    where = f"dataset {dataset_prefix} was tokenized with {want['path']}"
    if tok.vocab_size != want["vocab_size"]:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {where} (vocab size {want['vocab_size']}), but the tokenizer given, "
            f"{tok.path}, has vocab size {tok.vocab_size}. Use the dataset's tokenizer or re-tokenize."
        )
    if tok.fingerprint != want["fingerprint"]:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {where}; the tokenizer given, {tok.path}, has the same vocab size "
            f"({tok.vocab_size}) but a different vocabulary or special tokens (fingerprint {tok.fingerprint[:19]} "
            f"vs {want['fingerprint'][:19]}). Use the dataset's tokenizer or re-tokenize."
        )
    return meta


def open_tokenized(prefix: str | os.PathLike):
    """(tokens, loss mask) as megatron-core ``IndexedDataset``s; the mask is None if it was not written."""
    idx = _megatron()
    read_meta(prefix)
    tokens = idx.IndexedDataset(str(prefix))
    mask_prefix = loss_mask_prefix(prefix)
    mask = idx.IndexedDataset(mask_prefix) if idx.IndexedDataset.exists(mask_prefix) else None
    return tokens, mask


def tokenize_documents(
    documents: Sequence[Document],
    output_prefix: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    meco: bool = False,
    **kwargs,
) -> list[str]:
    """In-process convenience: tokenize ``documents`` as one task and merge. Returns the dataset prefixes."""
    step = TokenizeToIndexed(output_prefix, tokenizer, meco=meco, **kwargs)
    for _ in step.run(iter(documents), rank=0, world_size=1):
        pass
    return merge_shards(output_prefix)
