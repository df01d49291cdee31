"""How the model is spread over processes; the model itself (``kiln.pretrain.model``) is a plain single-device
module that knows nothing of this package.

- ``layout``: ``ParallelConfig`` (the recipe's ``parallel`` section) and ``Layout`` (TP x PP x DP); no torch.
- ``parallelize``: ``parallelize(model, groups, config)`` turns a plain ``KilnLlama`` into this rank's part:
  tensor parallelism by a plan, activation checkpointing, pipeline stages, materialising and initialising only
  the local parameters (torchtitan's ``parallelize.py`` shape).
- ``tensor_parallel``: the TP plan (module-name pattern -> column / row / vocab-embedding / vocab-head / ...),
  the megatron-core layers it swaps in, and full-size <-> TP-slice conversion of weights (``tp_slice``,
  ``full_state_dict``, ``load_full_state_dict``).
- ``pipeline``: DeepSpeed ``PipelineModule`` stages cut out of the model's own modules (tied embeddings shared
  by the first and last stage) and the pipeline -> model parameter names.
- ``topology``: process groups for TP x PP x DP from megatron-core ``parallel_state`` and DeepSpeed's
  topology, checked to agree; collective timeouts; ``MegatronMPU`` for DeepSpeed.

Imports run one way: this package uses ``kiln.pretrain.model`` / ``kiln.pretrain.config``, never the recipe, the
engine or the train loop, and the model never imports this package (``tests/test_import_direction.py``).
The tensor-parallel names load on first use, so ``import kiln.parallel.layout`` (recipe loading) imports no torch.
"""

from kiln.lazy import lazy_getattr
from kiln.parallel.layout import Layout, ParallelConfig

# Imported here, not lazily: the submodule of the same name would otherwise shadow the function once imported.
# It imports no torch at module level.
from kiln.parallel.parallelize import checkpoint_layers, parallelize

__getattr__ = lazy_getattr(
    __name__,
    {
        "TP_PLAN": "kiln.parallel.tensor_parallel",
        "full_state_dict": "kiln.parallel.tensor_parallel",
        "load_full_state_dict": "kiln.parallel.tensor_parallel",
        "tp_slice": "kiln.parallel.tensor_parallel",
        "tp_split_dim": "kiln.parallel.tensor_parallel",
    },
)

__all__ = [
    "TP_PLAN",
    "Layout",
    "ParallelConfig",
    "checkpoint_layers",
    "full_state_dict",
    "load_full_state_dict",
    "parallelize",
    "tp_slice",
    "tp_split_dim",
]
