"""Write packed SFT sequences: tokens, loss mask, per-conversation source ids and ``.meta.json``.

Layout of a prefix ``P`` (format ``kiln-sft-packed-v1``, described in data_pipeline/CONTRACTS.md):
``P.bin/.idx`` (megatron-core indexed dataset: one *document* per packed sequence, one *sequence* per
conversation in it, no padding stored), ``P_loss_mask.bin/.idx`` (uint8, same lengths), ``P.sources.npy``
(int16, the source of each conversation, in index order, names in the meta) and ``P.meta.json`` (written last:
its presence means the dataset is complete).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kiln.data_pipeline.sft.indexed import IndexedWriter, optimal_dtype

FORMAT = "kiln-sft-packed-v1"
LOSS_MASK_SUFFIX = "_loss_mask"  # as kiln.data_pipeline.tokenize writes it
SOURCES_SUFFIX = ".sources.npy"
META_SUFFIX = ".meta.json"


def write_meta(prefix: str | os.PathLike, meta: dict) -> None:
    path = Path(f"{prefix}{META_SUFFIX}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_packed(
    prefix: str | os.PathLike,
    examples: list,
    bins: list[list[int]],
    source_of_example: np.ndarray,
    source_names: list[str],
    *,
    tokenizer: dict,
    seq_length: int,
    pad_id: int,
    split: str,
    extra: dict | None = None,
) -> dict:
    """Write ``bins`` (lists of indices into ``examples``, each example with ``.ids`` and ``.mask``) in order;
    returns the meta written."""
    prefix = str(prefix)
    for suffix in (META_SUFFIX,):  # an interrupted rewrite must not look complete
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    dtype = optimal_dtype(int(tokenizer["vocab_size"]))
    tokens = IndexedWriter(prefix, dtype)
    masks = IndexedWriter(prefix + LOSS_MASK_SUFFIX, np.uint8)
    sources: list[int] = []
    n_tokens = n_loss = 0
    capacity = seq_length + 1
    for b in bins:
        lengths = [int(examples[i].ids.size) for i in b]
        if sum(lengths) > capacity:
            raise ValueError(f"a packed sequence of {sum(lengths)} tokens exceeds seq_length + 1 = {capacity}")
        tokens.add_document(np.concatenate([examples[i].ids for i in b]), lengths)
        masks.add_document(np.concatenate([examples[i].mask for i in b]), lengths)
        sources.extend(int(source_of_example[i]) for i in b)
        n_tokens += sum(lengths)
        n_loss += int(sum(int(examples[i].mask.sum()) for i in b))
    tokens.finalize()
    masks.finalize()
    np.save(prefix + SOURCES_SUFFIX, np.asarray(sources, dtype=np.int16))
    slots = len(bins) * capacity
    meta = {
        "format": FORMAT,
        "variant": "sft",
        "split": split,
        "tokenizer": tokenizer,
        "token_dtype": np.dtype(dtype).name,
        "loss_mask": Path(prefix).name + LOSS_MASK_SUFFIX,
        "seq_length": seq_length,
        "pack_tokens": capacity,
        "pad_id": int(pad_id),
        "packs": len(bins),
        "documents": len(sources),  # conversations (megatron sequences); `kiln data inspect` lists them
        "tokens": n_tokens,
        "loss_tokens": n_loss,
        "pad_tokens": slots - n_tokens,
        "packing_efficiency": n_tokens / slots if slots else 0.0,
        "sources": list(source_names),
        "source_of_document": Path(prefix).name + SOURCES_SUFFIX,
        **(extra or {}),
    }
    write_meta(prefix, meta)
    return meta
