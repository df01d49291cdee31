"""Tokenizers (train / load) and tokenization into the trainer's on-disk format (megatron-core indexed
datasets with a parallel loss mask and a ``.meta.json``). See `indexed` for the format.

Public API::

    from kiln.data_pipeline.tokenize import (
        Tokenizer, load_tokenizer, TokenizerTrainConfig, train_tokenizer,
        TokenizeToIndexed, MergeIndexedShards, merge_shards, list_shards,
        check_tokenizer_matches, open_tokenized, inspect_tokenized,
    )

The names are imported on first use: the `kiln data tokenize` command module lives in this package, and
registering it (every `kiln --help`) must not import datatrove, sentencepiece or megatron-core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.lazy import lazy_getattr

_MODULE_OF = {
    **dict.fromkeys(
        (
            "MergeIndexedShards",
            "TokenizerMismatchError",
            "TokenizeToIndexed",
            "check_tokenizer_matches",
            "dataset_prefix",
            "list_shards",
            "loss_mask_prefix",
            "merge_shards",
            "open_tokenized",
            "read_meta",
            "tokenize_documents",
        ),
        "indexed",
    ),
    "inspect_tokenized": "inspection",
    **dict.fromkeys(
        (
            "HFTokenizer",
            "SentencePieceTokenizer",
            "TokenizeError",
            "Tokenizer",
            "TokenizerNotFoundError",
            "load_tokenizer",
            "sentencepiece_to_hf",
        ),
        "tokenizer",
    ),
    **dict.fromkeys(("EmptyCorpusError", "TokenizerTrainConfig", "train_tokenizer"), "train"),
}

if TYPE_CHECKING:
    from kiln.data_pipeline.tokenize.indexed import (
        MergeIndexedShards,
        TokenizerMismatchError,
        TokenizeToIndexed,
        check_tokenizer_matches,
        dataset_prefix,
        list_shards,
        loss_mask_prefix,
        merge_shards,
        open_tokenized,
        read_meta,
        tokenize_documents,
    )
    from kiln.data_pipeline.tokenize.inspection import inspect_tokenized
    from kiln.data_pipeline.tokenize.tokenizer import (
        HFTokenizer,
        SentencePieceTokenizer,
        TokenizeError,
        Tokenizer,
        TokenizerNotFoundError,
        load_tokenizer,
        sentencepiece_to_hf,
    )
    from kiln.data_pipeline.tokenize.train import EmptyCorpusError, TokenizerTrainConfig, train_tokenizer


__getattr__ = lazy_getattr(__name__, {name: f"{__name__}.{module}" for name, module in _MODULE_OF.items()})


__all__ = [
    "EmptyCorpusError",
    "HFTokenizer",
    "MergeIndexedShards",
    "SentencePieceTokenizer",
    "TokenizeError",
    "TokenizeToIndexed",
    "Tokenizer",
    "TokenizerMismatchError",
    "TokenizerNotFoundError",
    "TokenizerTrainConfig",
    "check_tokenizer_matches",
    "dataset_prefix",
    "inspect_tokenized",
    "list_shards",
    "load_tokenizer",
    "loss_mask_prefix",
    "merge_shards",
    "open_tokenized",
    "read_meta",
    "sentencepiece_to_hf",
    "tokenize_documents",
    "train_tokenizer",
]
