"""A ``TrainEngine``'s state as sharded, layout-independent tensors: what a checkpoint's ``state/`` holds.

Names (the same at every layout, full global shapes from ``kiln.pretrain.model.full_shapes``)::

    model.<name>                 the weights the model computes with (bf16 or fp32)
    optimizer.fp32.<name>        the fp32 master weight (in fp32 training without ZeRO: the weight itself)
    optimizer.exp_avg.<name>     AdamW's first moment
    optimizer.exp_avg_sq.<name>  AdamW's second moment
    optimizer.step               AdamW's step count (int64, replicated)

``<name>`` is the KilnLlama (= Hugging Face without ``model.``) parameter name. Each rank contributes only what
it holds, as views into the engine's own buffers (`kiln.pretrain.shards.Shards`): its TP slice, or the flat ZeRO
fragment of it (up to three boxes per matrix); pieces several ranks hold (weights replicated over DP at ZeRO 0-2,
norms over TP) are written once by DCP's dedup, and the last pipeline stage's copy of a tied embedding is left
to the first stage. Loading asks for this layout's boxes and DCP writes them into the same kind of views, so a
checkpoint saved at any TP x PP x DP x ZeRO layout loads at any other without anything being gathered.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from kiln.parallel.tensor_parallel import tp_split_dim
from kiln.pretrain import sharded_io
from kiln.pretrain.engine import deepspeed_adapter as ds
from kiln.pretrain.engine.state import MASTER, ensure_adam_state, local_named_params, optimizer_step
from kiln.pretrain.model import full_shapes
from kiln.pretrain.shards import Shards

if TYPE_CHECKING:
    from kiln.pretrain.engine.core import TrainEngine

STEP_KEY = "optimizer.step"


def _tp_offset(name: str, shape: tuple[int, ...], tp_rank: int, tp: int) -> list[int]:
    """Where this rank's TP slice of ``name`` (of the TP-local ``shape``) starts in the full tensor."""
    offset = [0] * len(shape)
    dim = tp_split_dim(name)
    if dim is not None and tp > 1:
        offset[dim] = tp_rank * shape[dim]
    return offset


def sharded_state_dict(engine: TrainEngine, *, for_saving: bool) -> dict[str, Shards | torch.Tensor]:
    """This rank's pieces under the checkpoint names, as views into the engine's buffers. ``for_saving``: leave
    out what another rank writes (a pipeline replica of a tied weight) and read the step count (collective);
    for loading, without ZeRO the weight *is* the fp32 master and is loaded from ``optimizer.fp32`` only."""
    tp, tp_rank = engine.ctx.layout.tp, engine.ctx.tp_rank
    shapes = full_shapes(engine.cfg)
    opt = engine.engine.optimizer
    inner = ds.inner_optimizer(opt)
    sd: dict[str, Shards | torch.Tensor] = {}
    for name, p in local_named_params(engine):
        if for_saving and ds.is_pipeline_replica(p):
            continue
        local_shape = ds.local_shape(p)
        place = {"local_shape": local_shape, "local_offset": _tp_offset(name, local_shape, tp_rank, tp)}
        held, frag, kind = ds.weight_fragment(opt, p), ds.fragment(opt, p), ds.param_kind(p)
        if for_saving:
            # ZeRO 1/2 replicate the weights over DP: the DP rank holding the parameter's first optimizer element
            # writes them, so the files are as even as ZeRO's partitions (DCP's own dedup hands replicated items
            # to whichever rank has planned least so far, and left rank 1 of DP2 with 2/3 of the bytes)
            writes_weight = held is not None and (kind != "zero12" or (frag is not None and frag.start == 0))
        else:
            writes_weight = held is not None and kind != "plain"
        if writes_weight:
            sd[f"model.{name}"] = Shards.from_flat(shapes[name], **place, start=held[0], flat=held[1])
        if frag is None:
            continue
        sd[f"optimizer.{MASTER}.{name}"] = Shards.from_flat(
            shapes[name], **place, start=frag.start, flat=frag.of(frag.owner.data)
        )
        for key in ds.ADAM_KEYS:
            moment = frag.of(inner.state[frag.owner][key])
            sd[f"optimizer.{key}.{name}"] = Shards.from_flat(shapes[name], **place, start=frag.start, flat=moment)
    sd[STEP_KEY] = torch.tensor(optimizer_step(engine) if for_saving else 0, dtype=torch.int64)
    return sd


def _saving_state_dict(engine: TrainEngine) -> dict[str, Shards | torch.Tensor]:
    ensure_adam_state(engine, optimizer_step(engine))  # a save before the first update: AdamW's zero moments
    return sharded_state_dict(engine, for_saving=True)


@torch.no_grad()
def save_sharded_state(engine: TrainEngine, directory: str | os.PathLike) -> None:
    """Collective: every rank writes the pieces it holds into ``directory`` (DCP files)."""
    sharded_io.save(_saving_state_dict(engine), directory)


@torch.no_grad()
def async_save_sharded_state(engine: TrainEngine, directory: str | os.PathLike, *, process_group) -> Future:
    """Collective: copy this rank's pieces now, write them in the background (`kiln.pretrain.sharded_io.async_save`)."""
    return sharded_io.async_save(_saving_state_dict(engine), directory, process_group=process_group)


@torch.no_grad()
def load_sharded_state(engine: TrainEngine, directory: str | os.PathLike) -> int:
    """Collective: read this layout's pieces of a checkpoint saved at any layout into the engine, in place.
    Returns AdamW's step count. A checkpoint that does not fit the model raises CheckpointError naming the
    tensor (on every rank, before anything is read)."""
    ensure_adam_state(engine, 0)  # the moments must exist to be read into
    sd = sharded_state_dict(engine, for_saving=False)
    sharded_io.load(sd, directory)
    step = int(sd[STEP_KEY])
    ensure_adam_state(engine, step)
    ds.unlink_optimizer_views(engine.engine.optimizer)
    return step


__all__ = ["STEP_KEY", "async_save_sharded_state", "load_sharded_state", "save_sharded_state", "sharded_state_dict"]
