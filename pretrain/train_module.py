"""The contract between the trainer and what it trains (OLMo-core's train-module split).

The ``Trainer`` (``kiln.pretrain.trainer``) owns the loop, the metrics, the callbacks and cancellation; a train
module owns the model, the optimizer, the step and their state, and is the only thing that knows how they are
parallelised or written to disk. ``kiln.pretrain.engine.TrainEngine`` (DeepSpeed: ZeRO, pipeline, megatron TP)
is the one we ship; a plain single-device module would implement the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from kiln.pretrain.callbacks.base import TrainState


class TrainModule(ABC):
    @abstractmethod
    def train_batch(self, micro_batches: list[dict[str, Any]], global_batch: int, lr: float) -> dict[str, Any]:
        """Forward/backward over this rank's micro-batches of one global batch and the optimizer step (unless
        skipped). Returns ``loss`` and ``grad_norm`` (tensors may stay on the device), ``lr`` and ``skip``
        (host bool: the update was skipped), the same on every rank."""

    @abstractmethod
    def save_checkpoint(self, manager: Any, state: TrainState) -> Path:
        """Write step ``state.step`` (model, optimizer, ``state.checkpointed()``, RNG) under ``manager``'s root;
        called on every rank at the same step. Returns the checkpoint directory."""

    @abstractmethod
    def load_checkpoint(self, path: Path, state: TrainState) -> dict[str, Any]:
        """Load the checkpoint at ``path`` (saved at any layout) into this module and ``state``; returns its
        metadata."""

    @abstractmethod
    def finish_checkpoints(self, manager: Any) -> None:
        """Wait until every checkpoint started by ``save_checkpoint`` is complete on disk (asynchronous saves
        finish in the background); called at the end of training."""


__all__ = ["TrainModule"]
