"""What the trainer reads for instruction tuning: a `kiln data sft` output folder as global sample index ->
packed sample, and its held-out split of each source.

Sample ``i`` is packed sequence ``order(epoch)[k]`` of ``<output_dir>/train`` with ``epoch, k = divmod(i, n)``:
one permutation per epoch, drawn from ``(seed, epoch)``, so the data order is a pure function of the index (any
layout reads the same samples, and a resumed run continues where it stopped) and a second epoch does not replay
the first in the same order. The fields are `kiln.pretrain.data.pack_sample`'s, as for pretraining: labels
shifted, no label on a conversation's first token, positions restarting and attention kept inside each
conversation (``segment_ids``).

``heldout`` maps each source that has a held-out split (``heldout/<source>``) to a `HeldOut` with the
``batches(batch_size, max_batches, dp_rank, dp_size)`` interface the evaluator reads, so an SFT run reports
one held-out loss per source (``val_<source>_loss``): the agent and general curves AgentTuning compares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.data_pipeline.sft.dataset import SFTPackedDataset
from kiln.pretrain.data import collate, pack_sample, rank_sample_indices

REPORT_FILE = "report.json"


class HeldOut:
    """One source's held-out packed sequences, in order."""

    def __init__(self, name: str, data: SFTPackedDataset):
        self.name, self.data = name, data

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int, max_batches: int | None = None, dp_rank: int = 0, dp_size: int = 1):
        """Full batches of ``batch_size`` sequences per rank: the same global batches at every DP size. A split
        smaller than one global batch is read as one batch that wraps around to its start (the repeated
        sequences count twice), so a small source still gets a held-out loss."""
        global_batch = batch_size * dp_size
        n = len(self.data)
        n_batches = max(1, n // global_batch)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            idx = rank_sample_indices(b * global_batch, global_batch, dp_rank, dp_size)
            yield collate([pack_sample(*self.data.read(int(i) % n)) for i in idx])


class SFTTrainData:
    """Global sample index -> packed SFT sample (see the module docstring).

    Args:
        output_dir: a finished `kiln data sft` output (``train.*``, ``heldout/``, ``report.json``).
        seq_length: the trainer's sequence length, checked against the data's.
        model_vocab_size: checked against the tokenizer the data was built with.
    """

    def __init__(
        self, output_dir: str | os.PathLike, *, seed: int, seq_length: int, model_vocab_size: int | None = None
    ):
        self.root = Path(output_dir)
        if not (self.root / REPORT_FILE).is_file():
            raise ConfigError(
                f"{self.root}: no {REPORT_FILE}, so no finished `kiln data sft` output here (build it first, or "
                "let `kiln train` build it: it does when the folder is missing)"
            )
        self.train = SFTPackedDataset(self.root / "train")
        self.seed = seed
        data_seq = int(self.train.meta["seq_length"])
        if data_seq != seq_length:
            raise ConfigError(
                f"{self.root}: the data was packed for seq_length {data_seq}, the recipe has {seq_length}"
            )
        vocab = int(self.train.meta["tokenizer"]["vocab_size"])
        if model_vocab_size is not None and vocab > model_vocab_size:
            raise ConfigError(
                f"{self.root}: the data's tokenizer has {vocab} tokens, more than the model's vocab_size "
                f"{model_vocab_size}: build the data with the model's tokenizer"
            )
        if len(self.train) == 0:
            raise ConfigError(f"{self.root}/train holds no packed sequences")
        report = json.loads((self.root / REPORT_FILE).read_text())
        self.heldout = {
            name: HeldOut(name, SFTPackedDataset(self.root / "heldout" / name))
            for name in sorted(report.get("outputs", {}).get("heldout", {}))
        }
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.train)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:  # a long run moves through epochs; keep the few it reads
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.train))
        return self._orders[epoch]

    def index(self, i: int) -> int:
        """The packed sequence global sample ``i`` reads."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, k = divmod(int(i), len(self.train))
        return int(self._order(epoch)[k])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return pack_sample(*self.train.read(self.index(i)))


__all__ = ["HeldOut", "SFTTrainData"]
