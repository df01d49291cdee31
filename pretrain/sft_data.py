"""What the trainer reads for instruction tuning: a `kiln data sft` output folder as global sample index ->
packed sample, and its held-out split of each source.

Sample ``i`` is packed sequence ``order(epoch)[k]`` of ``<output_dir>/train`` with ``epoch, k = divmod(i, n)``:
one permutation per epoch, drawn from ``(seed, epoch)``, so the data order is a pure function of the index (any
layout reads the same samples, and a resumed run continues where it stopped) and a second epoch does not replay
the first in the same order. The fields are `kiln.pretrain.data.pack_sample`'s, as for pretraining: labels
shifted, no label on a conversation's first token, positions restarting and attention kept inside each
conversation (``segment_ids``).

``heldout_by_role`` maps ``agent`` / ``general`` to a `HeldOut` over the held-out splits of that role's sources
(``heldout/<source>``, in source order), with the ``batches(batch_size, max_batches, dp_rank, dp_size)``
interface the evaluator reads: an SFT run reports ``val_agent_loss`` and ``val_general_loss``, the two curves
AgentTuning compares. ``heldout`` has one per source (``eval.per_source``: ``val_source_<name>_loss``).
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


def ensure_sft_data(cfg, name: str | None = None) -> None:
    """Build the SFT data of ``cfg`` (an SFT recipe's data section) when its output folder has no finished
    build, so that ``kiln train recipes/sft/<recipe>.yaml`` is one command. Only a one-process run builds:
    ranks of a torchrun job would race on the same folder (and the build runs before any process group exists
    to elect a builder), so a job asks for ``kiln data sft`` first."""
    if (Path(cfg.output_dir) / REPORT_FILE).is_file():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{cfg.output_dir} has no finished SFT build: run `kiln data sft <recipe>` once before launching "
            "the torchrun job"
        )
    from kiln.data_pipeline.sft.build import build_sft
    from kiln.data_pipeline.sft.config import SFTDataRecipe, check_source_paths

    check_source_paths(cfg, name or "the recipe")
    try:
        build_sft(SFTDataRecipe(name=name or Path(cfg.output_dir).name, data=cfg))
    except ValueError as e:  # the builder's recipe errors, in the one `kiln: error:` format
        raise ConfigError(f"building the SFT data in {cfg.output_dir}: {e}") from None


class HeldOut:
    """The held-out packed sequences of one or more sources, in order."""

    def __init__(self, name: str, parts: list[SFTPackedDataset]):
        self.name, self.parts = name, parts
        self._offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def read(self, i: int):
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.parts[part].read(i - int(self._offsets[part]))

    def batches(self, batch_size: int, max_batches: int | None = None, dp_rank: int = 0, dp_size: int = 1):
        """Full batches of ``batch_size`` sequences per rank: the same global batches at every DP size. A split
        smaller than one global batch is read as one batch that wraps around to its start (the repeated
        sequences count twice), so a small source still gets a held-out loss."""
        global_batch = batch_size * dp_size
        n = len(self)
        n_batches = max(1, n // global_batch)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            idx = rank_sample_indices(b * global_batch, global_batch, dp_rank, dp_size)
            yield collate([pack_sample(*self.read(int(i) % n)) for i in idx])


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
        held = report.get("outputs", {}).get("heldout", {})
        opened = {name: SFTPackedDataset(self.root / "heldout" / name) for name in held}
        self.heldout = {name: HeldOut(name, [opened[name]]) for name in sorted(opened)}
        roles: dict[str, list[SFTPackedDataset]] = {}
        for name, source in report.get("sources", {}).items():  # the recipe's source order
            if name in opened:
                roles.setdefault(source["role"], []).append(opened[name])
        self.heldout_by_role = {role: HeldOut(role, parts) for role, parts in sorted(roles.items())}
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


__all__ = ["HeldOut", "SFTTrainData", "ensure_sft_data"]
