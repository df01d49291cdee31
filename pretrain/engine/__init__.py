"""The training engine: one optimizer step at any layout (``core``), which samples each rank trains on
(``batches``), its state for checkpoints: sharded, as views into its own buffers (``sharded_state``), or gathered
in full for the older format (``state``), every DeepSpeed internal it reads (``deepspeed_adapter``), the
DeepSpeed config of a recipe (``zero``) and the ``--dry-run`` memory estimate (``memory``)."""

from kiln.pretrain.engine.batches import SyntheticTokens, collate_indices, local_micro_batches
from kiln.pretrain.engine.core import TrainEngine

__all__ = ["SyntheticTokens", "TrainEngine", "collate_indices", "local_micro_batches"]
