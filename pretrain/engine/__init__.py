"""The training engine: one optimizer step at any layout (``core``), which samples each rank trains on
(``batches``), the full (layout-independent) optimizer state for checkpoints (``state``) and the ``--dry-run``
memory estimate (``memory``)."""

from kiln.pretrain.engine.batches import SyntheticTokens, collate_indices, local_micro_batches
from kiln.pretrain.engine.core import TrainEngine, checkpoint_layers

__all__ = ["SyntheticTokens", "TrainEngine", "checkpoint_layers", "collate_indices", "local_micro_batches"]
