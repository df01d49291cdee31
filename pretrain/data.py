"""Pretraining data: packed fixed-length samples from kiln's indexed datasets, a deterministic weighted blend,
a held-out validation split, and the MeCo metadata -> plain switch.

What a sample is
----------------
Each dataset (a megatron-core indexed dataset written by `kiln.data_pipeline.tokenize`, plus its ``_loss_mask``
twin) is read as an endless *token stream*: epoch ``e`` is the dataset's training documents in a permutation
drawn from ``(seed, dataset number, e)``, concatenated. Dataset-sample ``s`` is the ``seq_length + 1`` stream
tokens starting at ``s * seq_length`` (consecutive samples overlap by one token, as in Megatron's
``GPTDataset``, so every token is a label exactly once). The blend assigns global sample ``i`` to
``(dataset k, dataset-sample s)`` with megatron-core's ``build_blending_indices`` (the greedy
"most-behind-its-weight" rule of ``BlendedDataset``). Nothing depends on the data-parallel layout, the
number of workers or what was read before: **global sample i is a pure function of (config, i)**, so a
resume at another DP size (or TP/PP) sees exactly the same data. Ranks take contiguous slices of each
global batch (`rank_sample_indices`).

Fields (all ``[seq_length]``):

- ``input_ids = t[:-1]``, ``labels = t[1:]`` (already aligned: ``labels[j]`` is the target after
  ``input_ids[j]``; the model does not shift).
- ``loss_mask = mask[1:]`` from the dataset's loss mask (1 = the label is a prediction target). The label that
  crosses into the next document is that document's BOS, whose mask is 0, so the EOS -> BOS prediction never
  counts; we also force 0 at every label that starts a document, so datasets without a mask behave the same.
  MeCo metadata tokens have mask 0 in the ``_meco`` twin, so they never count either.
- ``segment_ids``: document number inside the sample (0, 1, 2, ...; a new id at every BOS), so attention
  stays inside a document.
- ``position_ids``: restart at 0 at every document start *and* at the sample start (a document continued from
  the previous sample starts at 0 too, as in Megatron's ``reset_position_ids``: positions never exceed
  ``seq_length - 1``, which RoPE caches and length-extrapolation settings assume).

MeCo (metadata conditioning, then cooldown)
-------------------------------------------
With ``meco.enabled`` each dataset prefix ``P`` names the twins ``P_meco`` (``[BOS] URL: host\\n\\n text
[EOS]``, metadata masked) and ``P_plain`` (``[BOS] text [EOS]``). They hold the same documents in the same
order and the text tokens are identical; only the prefix differs. Both twins use the *same* document
permutation per epoch, so "document position" (epoch, rank of the document in the epoch, offset in its text)
means the same thing in both. Global samples before ``cooldown_start_sample`` (the consumed-samples count at
the cooldown step, ``phase_for_step``) come from ``P_meco``. At the switch the stream position that the meco
phase reached is translated into the plain twin (same document, same text offset: the metadata tokens are
subtracted) and the plain phase continues from there. So no document is skipped or repeated at the switch,
and sample ``i`` is still a pure function of ``(config, total steps, batch schedule, i)``.
Validation uses the plain twins (the distribution the finished model is judged on).

Validation
----------
Either ``validation_fraction`` (a seeded random subset of each dataset's documents is held out of training)
or ``validation`` (separate dataset prefixes, used whole). Validation samples are packed the same way from a
single, unshuffled pass; every dataset contributes all its full samples.
"""

from __future__ import annotations

import bisect
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.config import ConfigError, validate_tree
from kiln.pretrain.config import DataConfig, DatasetSpec, MecoConfig  # noqa: F401 (re-exported)

PHASES = ("meco", "plain")


class DataError(ConfigError):
    """Training data that cannot be used (missing paths, tokenizer/vocabulary mismatch, broken MeCo twins)."""


# ------------------------------------------------------------------------------------------------ config


# DatasetSpec, MecoConfig and DataConfig live in kiln.pretrain.config (torch-free, so loading a recipe does not
# import torch) and are re-exported here.


# ------------------------------------------------------------------------------------------------ MeCo phases


def cooldown_step(total_steps: int, cooldown_fraction: float = 0.1) -> int:
    """First step of the MeCo cooldown (plain data): 90 of 100 steps with the default fraction."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    return total_steps - int(round(total_steps * cooldown_fraction))


def phase_for_step(step: int, total_steps: int, cooldown_fraction: float = 0.1) -> str:
    """ "meco" for steps before the cooldown step, "plain" from it on (``step`` counts from 0)."""
    return "meco" if step < cooldown_step(total_steps, cooldown_fraction) else "plain"


def rank_sample_indices(consumed_samples: int, global_batch_size: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Global sample indices of one step's batch held by data-parallel rank ``dp_rank``: a contiguous slice, so
    concatenating the slices of all ranks gives ``consumed_samples ... consumed_samples + global_batch_size``
    whatever ``dp_size`` is."""
    if global_batch_size % dp_size:
        raise DataError(f"global batch size {global_batch_size} is not divisible by data-parallel size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    per_rank = global_batch_size // dp_size
    start = consumed_samples + dp_rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ datasets


def _megatron_indexed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _open(prefix: str, tokenizer=None) -> tuple[object, object | None, dict]:
    """(tokens, mask or None, meta) of one dataset prefix, with clear errors for missing paths / tokenizers."""
    from kiln.data_pipeline.tokenize import TokenizeError, check_tokenizer_matches, open_tokenized, read_meta

    if not Path(f"{prefix}.meta.json").is_file() and not Path(f"{prefix}.bin").is_file():
        parent = Path(prefix).parent
        where = "" if parent.is_dir() else f" (directory {parent} does not exist either)"
        raise DataError(f"data path {prefix} does not exist: no {prefix}.meta.json / {prefix}.bin{where}")
    try:
        meta = check_tokenizer_matches(prefix, tokenizer) if tokenizer is not None else read_meta(prefix)
        tokens, mask = open_tokenized(prefix)
    except TokenizeError as e:
        raise DataError(f"data path {prefix}: {e}") from None
    return tokens, mask, meta


class _Stream:
    """One dataset's documents (a subset ``doc_ids``) as an endless token stream of seeded-shuffled epochs."""

    def __init__(self, tokens, mask, doc_ids: np.ndarray, seed_key: tuple[int, ...], shuffle: bool = True):
        self.tokens, self.mask = tokens, mask
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.lengths = np.asarray(tokens.sequence_lengths, dtype=np.int64)
        self.seed_key = seed_key
        self.shuffle = shuffle
        self.epoch_tokens = int(self.lengths[self.doc_ids].sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(documents in order, cumulative token ends) of epoch ``e`` (a small LRU cache)."""
        if e in self._epochs:
            self._epochs.move_to_end(e)
            return self._epochs[e]
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self.seed_key, e])))
            docs = self.doc_ids[rng.permutation(self.doc_ids.size)]
        else:
            docs = self.doc_ids
        ends = np.cumsum(self.lengths[docs])
        self._epochs[e] = (docs, ends)
        if len(self._epochs) > 4:
            self._epochs.popitem(last=False)
        return docs, ends

    def locate(self, pos: int) -> tuple[int, int, int]:
        """Stream position -> (epoch, rank of the document in the epoch, offset inside the document)."""
        e, q = divmod(pos, self.epoch_tokens)
        _, ends = self.epoch(e)
        k = int(np.searchsorted(ends, q, side="right"))
        start = int(ends[k - 1]) if k else 0
        return e, k, q - start

    def position(self, e: int, k: int, offset: int) -> int:
        _, ends = self.epoch(e)
        return e * self.epoch_tokens + (int(ends[k - 1]) if k else 0) + offset

    def read(self, pos: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``length`` stream tokens from ``pos``: (tokens int64, loss mask uint8, document-start flags bool)."""
        toks = np.empty(length, dtype=np.int64)
        mask = np.empty(length, dtype=np.uint8)
        starts = np.zeros(length, dtype=bool)
        e, k, off = self.locate(pos)
        docs, _ = self.epoch(e)
        filled = 0
        while filled < length:
            if k == docs.size:
                e, k = e + 1, 0
                docs, _ = self.epoch(e)
            doc = int(docs[k])
            n = min(int(self.lengths[doc]) - off, length - filled)
            toks[filled : filled + n] = self.tokens.get(doc, off, n)
            if self.mask is not None:
                mask[filled : filled + n] = self.mask.get(doc, off, n)
            else:
                mask[filled : filled + n] = 1
            if off == 0:
                starts[filled] = True
                mask[filled] = 0  # BOS is never a target
            filled += n
            k, off = k + 1, 0
        return toks, mask, starts


def pack_sample(tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
    """``seq_length + 1`` stream tokens -> the model's aligned fields (see the module docstring)."""
    label_mask = mask[1:].astype(np.float32)
    label_mask[starts[1:]] = 0.0  # a label that opens the next document (its BOS) is never a target
    in_starts = starts[:-1]
    segment_ids = np.cumsum(in_starts) - int(in_starts[0])
    idx = np.arange(in_starts.size)
    first = np.maximum.accumulate(np.where(in_starts, idx, 0))
    return {
        "input_ids": torch.from_numpy(tokens[:-1].copy()),
        "labels": torch.from_numpy(tokens[1:].copy()),
        "loss_mask": torch.from_numpy(label_mask),
        "position_ids": torch.from_numpy(idx - first),
        "segment_ids": torch.from_numpy(segment_ids.astype(np.int64)),
    }


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@dataclass
class SampleInfo:
    """Where global sample ``i`` comes from."""

    dataset: int  # index into DataConfig.datasets
    dataset_sample: int  # sample index inside that dataset
    phase: str  # "meco", "plain", or "text" (no MeCo)
    prefix: str  # the dataset prefix actually read


class _TrainDataset:
    """One entry of the blend: its stream(s) and, with MeCo, the meco -> plain switch."""

    def __init__(self, number: int, spec: DatasetSpec, cfg: DataConfig, tokenizer, val_docs_out: list):
        self.spec = spec
        self.seq = cfg.seq_length
        key = (cfg.seed, number)
        variants = ("meco", "plain") if cfg.meco.enabled else (None,)
        opened = {}
        for v in variants:
            prefix = f"{spec.prefix}_{v}" if v else spec.prefix
            if v is None and not Path(f"{prefix}.meta.json").is_file() and Path(f"{prefix}_meco.meta.json").is_file():
                raise DataError(
                    f"data path {prefix} is MeCo data ({prefix}_meco / {prefix}_plain): set data.meco.enabled "
                    f"or name one twin"
                )
            opened[v] = (prefix, *_open(prefix, tokenizer))
        self.opened = opened
        first_prefix, first_tokens = opened[variants[0]][0], opened[variants[0]][1]
        n_docs = len(first_tokens.sequence_lengths)
        if cfg.meco.enabled:
            self._check_twins(opened)
        doc_ids = np.arange(n_docs, dtype=np.int64)
        if cfg.validation_fraction > 0 and not cfg.validation:
            n_val = max(1, int(math.ceil(cfg.validation_fraction * n_docs)))
            if n_val >= n_docs:
                raise DataError(
                    f"{first_prefix}: validation_fraction {cfg.validation_fraction} leaves no training documents"
                )
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, number, 2**31 - 1])))
            held = np.sort(rng.permutation(n_docs)[:n_val])
            doc_ids = np.setdiff1d(doc_ids, held)
            val_variant = "plain" if cfg.meco.enabled else None
            val_prefix, val_tokens, val_mask, _ = opened[val_variant]
            val_docs_out.append((val_prefix, val_tokens, val_mask, held))
        self.streams = {v: _Stream(o[1], o[2], doc_ids, key) for v, o in opened.items()}
        for v, s in self.streams.items():
            if s.epoch_tokens < self.seq + 1:
                raise DataError(
                    f"{opened[v][0]}: {s.epoch_tokens} training tokens, fewer than one sample of seq_length + 1 = "
                    f"{self.seq + 1}"
                )
        self.switch_sample: int | None = None  # dataset-sample index where the plain phase starts
        self.plain_base = 0

    @staticmethod
    def _check_twins(opened) -> None:
        (mp, mt, _, _), (pp, pt, _, _) = opened["meco"], opened["plain"]
        ml, pl = np.asarray(mt.sequence_lengths), np.asarray(pt.sequence_lengths)
        if ml.size != pl.size:
            raise DataError(f"MeCo twins differ: {mp} has {ml.size} documents, {pp} has {pl.size}")
        if np.any(ml < pl):
            raise DataError(f"MeCo twins differ: a document of {mp} is shorter than in {pp} (not the same corpus)")

    def set_switch(self, switch_sample: int) -> None:
        """Plain phase from dataset-sample ``switch_sample`` on, continuing at the meco phase's text position."""
        self.switch_sample = switch_sample
        meco, plain = self.streams["meco"], self.streams["plain"]
        e, k, off = meco.locate(switch_sample * self.seq)
        docs, _ = meco.epoch(e)
        doc = int(docs[k])
        prefix_len = int(meco.lengths[doc] - plain.lengths[doc])
        plain_off = 0 if off == 0 else max(1, off - prefix_len)  # BOS consumed: continue at the text
        self.plain_base = plain.position(e, k, plain_off)

    def locate_sample(self, s: int) -> tuple[str | None, int]:
        if self.switch_sample is None:
            variant = "meco" if "meco" in self.streams else None
            return variant, s * self.seq
        if s < self.switch_sample:
            return "meco", s * self.seq
        return "plain", self.plain_base + (s - self.switch_sample) * self.seq

    def sample(self, s: int) -> tuple[dict[str, torch.Tensor], str | None]:
        variant, pos = self.locate_sample(s)
        return pack_sample(*self.streams[variant].read(pos, self.seq + 1)), variant


class _Blend:
    """Global sample -> (dataset, dataset-sample) with megatron-core's greedy blending (grown on demand; the
    greedy choice at i depends only on the weights and i, so growing never changes earlier entries)."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.dataset_index = np.zeros(0, dtype=np.int16)
        self.dataset_sample_index = np.zeros(0, dtype=np.int64)

    def ensure(self, size: int) -> None:
        if size <= self.dataset_index.size:
            return
        size = max(size, 2 * self.dataset_index.size, 1024)
        if self.weights.size == 1:
            self.dataset_index = np.zeros(size, dtype=np.int16)
            self.dataset_sample_index = np.arange(size, dtype=np.int64)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
        di = np.zeros(size, dtype=np.int16)
        dsi = np.zeros(size, dtype=np.int64)
        helpers_cpp.build_blending_indices(di, dsi, self.weights, self.weights.size, size, False)
        self.dataset_index, self.dataset_sample_index = di, dsi

    def __call__(self, i: int) -> tuple[int, int]:
        self.ensure(i + 1)
        return int(self.dataset_index[i]), int(self.dataset_sample_index[i])

    def counts_before(self, n: int) -> np.ndarray:
        """How many of global samples [0, n) each dataset got."""
        self.ensure(n + 1)
        return np.bincount(self.dataset_index[:n], minlength=self.weights.size)


class ValidationData:
    """Held-out samples (plain text under MeCo), packed from one unshuffled pass over each dataset."""

    def __init__(self, parts: list[tuple[str, object, object, np.ndarray]], seq_length: int):
        self.seq = seq_length
        self.streams: list[tuple[str, _Stream, int]] = []
        for prefix, tokens, mask, docs in parts:
            stream = _Stream(tokens, mask, docs, (0,), shuffle=False)
            n = (stream.epoch_tokens - 1) // seq_length
            if n > 0:
                self.streams.append((prefix, stream, n))
        self._offsets = np.cumsum([0] + [n for _, _, n in self.streams]).tolist()

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"validation sample {i} out of range ({len(self)} samples)")
        part = bisect.bisect_right(self._offsets, i) - 1
        _, stream, _ = self.streams[part]
        return pack_sample(*stream.read((i - self._offsets[part]) * self.seq, self.seq + 1))

    def batches(self, batch_size: int, max_batches: int | None = None, dp_rank: int = 0, dp_size: int = 1):
        """Full batches of ``batch_size`` samples per rank, in order (the same samples whatever dp_size is
        when ``batch_size * dp_size`` is the global eval batch)."""
        global_batch = batch_size * dp_size
        n_batches = len(self) // global_batch
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            idx = rank_sample_indices(b * global_batch, global_batch, dp_rank, dp_size)
            yield collate([self[int(i)] for i in idx])


class PretrainData:
    """Global sample index -> packed training sample (see the module docstring).

    Args:
        cfg: the data config (validated here).
        total_steps, samples_at_step: needed with MeCo to place the cooldown; ``samples_at_step`` is the global
            batch size (constant batch) or a function ``step -> consumed samples before that step`` (batch-size
            ramp-up).
        model_vocab_size: checked against every dataset's tokenizer vocabulary.
        tokenizer: overrides ``cfg.tokenizer`` (a path or a `Tokenizer`); fingerprints are checked when given.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        total_steps: int | None = None,
        samples_at_step: int | Callable[[int], int] | None = None,
        model_vocab_size: int | None = None,
        tokenizer: str | os.PathLike | object | None = None,
    ):
        try:
            validate_tree(cfg, "data")  # the whole section (datasets, meco) once, named by its recipe key
        except ValueError as e:
            raise DataError(str(e)) from None
        self.cfg = cfg
        tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
        val_parts: list = []
        self.datasets = [_TrainDataset(n, spec, cfg, tokenizer, val_parts) for n, spec in enumerate(cfg.datasets)]
        if cfg.validation:
            for spec in cfg.validation:
                prefix = f"{spec.prefix}_plain" if cfg.meco.enabled else spec.prefix
                tokens, mask, _ = _open(prefix, tokenizer)
                val_parts.append((prefix, tokens, mask, np.arange(len(tokens.sequence_lengths))))
        self.validation = ValidationData(val_parts, cfg.seq_length) if val_parts else None
        self.vocab_size = self._check_vocab(model_vocab_size)
        self.blend = _Blend([d.spec.weight for d in self.datasets])
        self.cooldown_start_sample: int | None = None
        if cfg.meco.enabled:
            if total_steps is None or samples_at_step is None:
                raise DataError("MeCo data needs total_steps and samples_at_step to place the cooldown")
            at = samples_at_step if callable(samples_at_step) else (lambda step, g=samples_at_step: step * g)
            self.total_steps = total_steps
            self.cooldown_step = cooldown_step(total_steps, cfg.meco.cooldown_fraction)
            self.cooldown_start_sample = int(at(self.cooldown_step))
            counts = self.blend.counts_before(self.cooldown_start_sample)
            for d, c in zip(self.datasets, counts):
                d.set_switch(int(c))

    def _check_vocab(self, model_vocab_size: int | None) -> int:
        vocab = 0
        for d in self.datasets:
            for prefix, _, _, meta in d.opened.values():
                v = int(meta["tokenizer"]["vocab_size"])
                vocab = max(vocab, v)
                if model_vocab_size is not None and v > model_vocab_size:
                    raise DataError(
                        f"tokenizer/model mismatch: {prefix} was tokenized with {meta['tokenizer']['path']} "
                        f"(vocab size {v}) but the model's vocab_size is {model_vocab_size}: token ids would "
                        f"index past the embedding. Use a model with vocab_size >= {v} or re-tokenize."
                    )
        fingerprints = {
            meta["tokenizer"].get("fingerprint") for d in self.datasets for _, _, _, meta in d.opened.values()
        }
        if len(fingerprints) > 1:
            raise DataError(
                "the blended datasets were tokenized with different tokenizers: "
                + ", ".join(
                    f"{p} ({m['tokenizer']['path']})" for d in self.datasets for p, _, _, m in d.opened.values()
                )
            )
        return vocab

    def info(self, i: int) -> SampleInfo:
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        k, s = self.blend(i)
        variant, _ = self.datasets[k].locate_sample(s)
        prefix = self.datasets[k].opened[variant][0]
        return SampleInfo(k, s, variant or "text", prefix)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        k, s = self.blend(int(i))
        return self.datasets[k].sample(s)[0]

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate([self[int(i)] for i in indices])

    def rank_batch(
        self, consumed_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """This DP rank's part of the global batch that starts at ``consumed_samples``."""
        return self.get_batch(rank_sample_indices(consumed_samples, global_batch_size, dp_rank, dp_size))

    def phase_for_sample(self, i: int) -> str:
        if self.cooldown_start_sample is None:
            return "text"
        return "meco" if i < self.cooldown_start_sample else "plain"
