"""``parallelize(model, groups, config)``: a plain ``KilnLlama`` -> this rank's part of it, in the order
torchtitan's ``parallelize.py`` applies things:

1. tensor parallelism by ``kiln.parallel.tensor_parallel.TP_PLAN`` (megatron-core layers holding this rank's
   slices; the vocab-parallel loss and logits gather);
2. activation checkpointing (each decoder layer recomputed in the backward pass);
3. materialise and initialise: parameters still on the meta device are allocated (on the CPU; DeepSpeed moves
   them), only for this rank's pipeline stage, and with ``init_seed`` every local parameter gets its slice of
   ``kiln.pretrain.model.initial_weights`` (the one init, drawn in full in a fixed order, so any layout starts
   from the weights of a 1-rank run);
4. pipeline parallelism (PP > 1): a DeepSpeed ``PipelineModule`` cut out of the same modules
   (``kiln.parallel.pipeline``).

Memory. Built with ``KilnLlama(cfg, device="meta")`` nothing full-size is ever allocated: a rank allocates its
TP slice of its stage's parameters, and the init holds one full tensor at a time (the largest: the embedding,
``vocab x hidden`` fp32). A model built materialised (``KilnLlama(cfg)``) is sliced instead, which costs the
full model on every rank until the plain weights are dropped; that is what HF import at TP = 1 and the tests
comparing TP with one process do.

Kept import-light (torch and the pieces are imported inside the functions) so that ``kiln.parallel`` can export
``parallelize`` while ``import kiln.parallel.layout`` (recipe loading) still imports no torch. The package
attribute ``kiln.parallel.parallelize`` is the function, not this module (``import kiln.parallel.parallelize as
m`` gives the function too): reach this module's other names with ``from kiln.parallel.parallelize import ...``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.distributed as dist
    import torch.nn as nn

    from kiln.parallel.layout import ParallelConfig
    from kiln.parallel.topology import ParallelContext
    from kiln.pretrain.model import KilnLlama


def parallelize(
    model: KilnLlama,
    groups: ParallelContext | dist.ProcessGroup | None = None,
    config: ParallelConfig | None = None,
    *,
    init_seed: int | None = None,
) -> nn.Module:
    """This rank's part of ``model``: the model itself, split over the TP group (PP = 1), or a DeepSpeed
    ``PipelineModule`` over its modules (PP > 1).

    ``groups``: a ``ParallelContext`` (``kiln.parallel.topology.init_parallel``: its TP group, PP size and
    DeepSpeed topology), or just a TP process group (TP only, e.g. HF import / export; a 1-rank group still
    swaps in megatron's layers), or None (one process: checkpointing, materialising, init only). A context at
    TP = 1 has no TP group and keeps the plain layers. ``config``: the recipe's ``parallel`` section, for
    ``activation_checkpointing``. ``init_seed``: initialise this rank's parameters from
    ``initial_weights(cfg, init_seed)``; None keeps the weights a materialised model had (sliced) and leaves a
    meta-built model's parameters uninitialised for a checkpoint (``kiln.parallel.load_full_state_dict``).
    """
    import torch
    import torch.distributed as dist

    from kiln.config import ConfigError
    from kiln.parallel import pipeline
    from kiln.parallel import tensor_parallel as tp
    from kiln.pretrain.model import initial_weights

    ctx = groups if hasattr(groups, "layout") else None
    tp_group = ctx.tp_group if ctx is not None else groups
    pp, pp_rank = (ctx.layout.pp, ctx.pp_rank) if ctx is not None else (1, 0)
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    cfg = model.cfg
    cfg.validate_tp(tp_size)
    sequence_parallel = cfg.sequence_parallel and tp_size > 1
    if sequence_parallel and not torch.cuda.is_available():
        raise ConfigError(
            "model.sequence_parallel needs CUDA: megatron-core's sequence-parallel collectives allocate their "
            "buffers on torch.cuda.current_device()"
        )

    if tp_group is not None:
        tp.apply_tensor_parallel(model, tp_group, sequence_parallel=sequence_parallel)
    if config is not None and config.activation_checkpointing:
        checkpoint_layers(model)
    local = pipeline.stage_modules(model, pp, pp_rank) if pp > 1 else [model]
    for module in local:
        materialize(module)
    if init_seed is not None:
        tp.copy_full_tensors(model, initial_weights(cfg, init_seed))
    tp.mark_tensor_parallel_params(model, tp_size)
    if pp > 1:
        return pipeline.cut_pipeline(model, ctx.topology)
    return model


def materialize(module: nn.Module, device: Any = "cpu") -> None:
    """Allocate (uninitialised) every parameter of ``module`` that is still on the meta device; the others are
    left as they are. Buffers are materialised too (the model has none of its own today)."""
    import torch

    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_meta:
                new = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)  # keep attributes such as sequence_parallel
                setattr(sub, name, new)
        for name, b in list(sub.named_buffers(recurse=False)):
            if b.is_meta:
                sub.register_buffer(name, torch.empty_like(b, device=device))


def checkpoint_layers(model: KilnLlama, checkpoint: Callable[..., Any] | None = None) -> None:
    """Recompute each decoder layer's activations in the backward pass (activation checkpointing), keeping the
    parameter names (the layer's ``forward`` is wrapped on the instance, not the module replaced), so that the
    same wrapping serves PP = 1 and the pipeline stages, which call the model's layers."""
    import torch.utils.checkpoint

    checkpoint = checkpoint or functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for layer in model.layers:
        inner = layer.forward
        layer.forward = functools.partial(checkpoint, inner)


__all__ = ["checkpoint_layers", "materialize", "parallelize"]
