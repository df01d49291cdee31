"""How the model is spread over processes (the model itself lives in ``kiln.pretrain.model``).

- ``topology``: process groups for TP x PP x DP from megatron-core ``parallel_state`` and DeepSpeed's
  ``PipeModelDataParallelTopology``, checked to agree; collective timeouts; ``MegatronMPU`` for DeepSpeed.
- ``pipeline``: KilnLlama cut into a DeepSpeed ``PipelineModule`` (balanced partition, tied embeddings).
- ``zero``: the DeepSpeed config (ZeRO stage, AdamW, clipping, precision) and the TP marks its gradient norm
  needs.
"""
