"""The training engine: one optimizer step at any layout (``core``), which samples each rank trains on
(``batches``), the full (layout-independent) optimizer state for checkpoints (``state``), the DeepSpeed config
of a recipe (``zero``) and the ``--dry-run`` memory estimate (``memory``)."""

from kiln.pretrain.engine.batches import SyntheticTokens, collate_indices, local_micro_batches
from kiln.pretrain.engine.core import TrainEngine

__all__ = ["SyntheticTokens", "TrainEngine", "collate_indices", "local_micro_batches"]
