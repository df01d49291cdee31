"""Which samples each rank trains on, and a synthetic token source for tests and the CPU demo.

A step consumes the global samples ``consumed ... consumed + global_batch``; data-parallel rank ``r`` takes the
contiguous slice ``kiln.pretrain.data.rank_sample_indices`` gives it and cuts it into micro-batches of
``micro_batch`` samples. So the set of micro-batches of a step (and hence the averaged loss and gradient) is the
same at every layout; only which rank computes which micro-batch changes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kiln.pretrain.data import collate, rank_sample_indices


class SyntheticTokens:
    """Learnable deterministic samples: each document is an arithmetic sequence ``(a + b * t) mod vocab`` whose
    start ``a`` and stride ``b`` are drawn from a generator seeded with ``(seed, i)``. Same fields as
    ``kiln.pretrain.data.PretrainData`` samples. ``documents_per_sample`` > 1 packs that many documents of equal
    length into a sample, with ``segment_ids``, positions restarting per document, and no loss on the label that
    crosses into the next document."""

    def __init__(
        self, vocab_size: int, seq_length: int, seed: int = 1234, documents_per_sample: int = 1, max_stride: int = 7
    ):
        if seq_length % documents_per_sample:
            raise ValueError(
                f"seq_length {seq_length} is not a multiple of documents_per_sample {documents_per_sample}"
            )
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.documents, self.max_stride = documents_per_sample, max_stride

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        doc_len = self.seq_length // self.documents
        docs = []
        for d in range(self.documents):
            a = int(torch.randint(0, self.vocab_size, (1,), generator=gen))
            b = int(torch.randint(1, self.max_stride + 1, (1,), generator=gen))
            length = doc_len + 1 if d == self.documents - 1 else doc_len  # + the last label
            docs.append((a + b * torch.arange(length)) % self.vocab_size)
        tokens = torch.cat(docs)
        sample = {
            "input_ids": tokens[:-1].clone(),
            "labels": tokens[1:].clone(),
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }
        if self.documents > 1:
            sample["loss_mask"][doc_len - 1 :: doc_len][:-1] = 0.0  # the label is the next document's first token
            sample["position_ids"] = torch.arange(doc_len).repeat(self.documents)
            sample["segment_ids"] = torch.arange(self.documents).repeat_interleave(doc_len)
        return sample


def local_micro_batches(
    dataset, consumed_samples: int, global_batch: int, *, micro_batch: int, dp_rank: int = 0, dp_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches (each ``[micro_batch, seq]`` per field) of the step at ``consumed_samples``."""
    indices = rank_sample_indices(consumed_samples, global_batch, dp_rank, dp_size)
    if len(indices) % micro_batch:
        raise ValueError(f"{len(indices)} samples per rank is not a multiple of micro_batch {micro_batch}")
    return [collate_indices(dataset, indices[j : j + micro_batch]) for j in range(0, len(indices), micro_batch)]


def trainable_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1.0 where a label carries loss: not -100 and not masked (the rule of ``kiln.pretrain.model.LMLoss``),
    as float64 so that counts over many batches stay exact."""
    weight = (batch["labels"] != -100).double()
    if batch.get("loss_mask") is not None:
        weight = weight * batch["loss_mask"].double()
    return weight


def collate_indices(dataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    return collate([dataset[int(i)] for i in indices])


@dataclass
class StepBatch:
    """This rank's micro-batches of the step that starts at global sample ``consumed_samples``."""

    consumed_samples: int
    global_batch: int
    micro_batches: list[dict[str, torch.Tensor]]


class StepBatches:
    """The coming steps' micro-batches of this rank, prepared ``prefetch`` steps ahead on a background thread.

    Reading and collating samples (memory-mapped token files, packing, MeCo prefixes) then overlaps the step
    that is running instead of delaying the next one; torch's kernels release the GIL, so the thread mostly
    runs while the main thread waits on compute. With ``pin_memory`` (CUDA) the batches are copied into
    page-locked memory there too, so the engine's ``.to(device, non_blocking=True)`` is a true async copy.
    ``prefetch=0`` prepares each step on the loop thread (no thread). An error reading the data is raised on
    the loop thread, at the step that needed the batch.

    Use as a context manager (the thread stops on exit) and iterate: ``for step in batches: ...``.

    Args:
        dataset: global sample index -> sample.
        global_batch_at: ``consumed_samples -> global batch`` (the recipe's batch ramp-up).
        start: the data position of the first step (``state.consumed_samples``); ``steps``: how many steps.
    """

    def __init__(
        self,
        dataset,
        global_batch_at: Callable[[int], int],
        *,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        start: int,
        steps: int,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.dataset, self.global_batch_at = dataset, global_batch_at
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.start, self.steps, self.prefetch, self.pin_memory = start, steps, prefetch, pin_memory
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _positions(self) -> Iterator[tuple[int, int]]:
        consumed = self.start
        for _ in range(self.steps):
            global_batch = self.global_batch_at(consumed)
            yield consumed, global_batch
            consumed += global_batch

    def _build(self, consumed: int, global_batch: int) -> StepBatch:
        micro = local_micro_batches(
            self.dataset,
            consumed,
            global_batch,
            micro_batch=self.micro_batch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        if self.pin_memory:
            micro = [{k: v.pin_memory() for k, v in mb.items()} for mb in micro]
        return StepBatch(consumed, global_batch, micro)

    def _put(self, item: StepBatch | BaseException) -> bool:
        """Queue ``item`` unless the loop has stopped (False then: the consumer is gone)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for consumed, global_batch in self._positions():
                if not self._put(self._build(consumed, global_batch)):
                    return
        except BaseException as e:  # handed to the loop thread, which raises it
            self._put(e)

    def __enter__(self) -> StepBatches:
        if self.prefetch > 0:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, name="kiln-batches", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __iter__(self) -> Iterator[StepBatch]:
        if self._queue is None:
            for consumed, global_batch in self._positions():
                yield self._build(consumed, global_batch)
            return
        for _ in range(self.steps):
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


class SyntheticValidation:
    """A held-out split for synthetic runs: the samples of ``SyntheticTokens`` under another seed, in order,
    with ``PretrainData.validation``'s ``batches`` interface (the same global batches at every DP size)."""

    def __init__(self, source: SyntheticTokens):
        self.source = source

    def batches(self, batch_size: int, max_batches: int | None = None, dp_rank: int = 0, dp_size: int = 1):
        if max_batches is None:
            raise ValueError("synthetic validation data is unbounded: give max_batches")
        global_batch = batch_size * dp_size
        for b in range(max_batches):
            start = b * global_batch + dp_rank * batch_size
            yield collate_indices(self.source, range(start, start + batch_size))


__all__ = [
    "StepBatch",
    "StepBatches",
    "SyntheticTokens",
    "SyntheticValidation",
    "collate_indices",
    "local_micro_batches",
    "trainable_tokens",
]
