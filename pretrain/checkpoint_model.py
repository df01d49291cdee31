"""The model of a training checkpoint (``checkpoints/step_XXXXXXX``), for ``kiln export-hf`` / ``kiln generate``
through ``kiln.pretrain.hf_io.load_model``: in one process, without a process group, whatever layout trained it.

The config is ``meta.json``'s ``model``. The weights (``model.<name>``, the weights the model computed with) are
read from ``state/`` with DCP's no-process-group path straight into the new model's parameters (at ``tp_size`` >
1 only this TP rank's slice is read), or from ``model.safetensors`` in the older full format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kiln.config import apply_overrides, build_dataclass
from kiln.parallel.tensor_parallel import tp_slice, tp_split_dim
from kiln.pretrain.checkpoint import (
    META_FILE,
    MODEL_FILE,
    SHARDED_DIR,
    TRAIN_STATE_FILE,
    CheckpointError,
    checkpoint_format,
)
from kiln.pretrain.config import ModelConfig
from kiln.pretrain.model import KilnLlama, check_full_shapes


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / TRAIN_STATE_FILE).is_file()


def checkpoint_config(path: str | os.PathLike, **ours) -> ModelConfig:
    """The ModelConfig a training checkpoint was saved with (``ours`` overrides fields, e.g. fused_kernels)."""
    meta_path = Path(path) / META_FILE
    model = json.loads(meta_path.read_text()).get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{meta_path} has no 'model' entry (the ModelConfig the checkpoint was trained with)")
    data = apply_overrides(dict(model), [f"{k}={json.dumps(v)}" for k, v in ours.items()])
    return build_dataclass(ModelConfig, data, source=str(meta_path))


def _load_sharded_weights(model: KilnLlama, directory: Path, tp_rank: int, tp_size: int) -> None:
    from kiln.pretrain import sharded_io
    from kiln.pretrain.shards import Shards

    shapes = sharded_io.full_shapes_of(sharded_io.read_metadata(directory), prefix="model.")
    check_full_shapes(model.cfg, shapes, source=str(directory))
    sd = {}
    for name, p in model.named_parameters():
        offset = [0] * p.dim()
        if tp_split_dim(name) is not None and tp_size > 1:
            offset[tp_split_dim(name)] = tp_rank * p.shape[tp_split_dim(name)]
        sd[f"model.{name}"] = Shards(shapes[name], [(offset, p.data)])
    sharded_io.load(sd, directory, no_dist=True)


def _load_full_weights(model: KilnLlama, ckpt: Path, tp_rank: int, tp_size: int) -> None:
    from safetensors import safe_open

    with safe_open(ckpt / MODEL_FILE, framework="pt") as f:
        check_full_shapes(model.cfg, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, source=str(ckpt))
        for name, p in model.named_parameters():
            p.data.copy_(tp_slice(name, f.get_tensor(name), tp_rank, tp_size))


@torch.no_grad()
def load_checkpoint_model(
    path: str | os.PathLike,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    tp_group=None,
    dtype: torch.dtype = torch.float32,
    **ours,
) -> tuple[KilnLlama, ModelConfig]:
    """(model, config) from a training checkpoint directory, sharded or full format. No process group is needed
    at ``tp_size`` 1; a tensor whose shape differs from the config is a ValueError naming it."""
    path = Path(path)
    cfg = checkpoint_config(path, **ours)
    cfg.validate_tp(tp_size)
    from kiln.pretrain.hf_io import empty_model

    model = empty_model(cfg, tp_group, dtype)
    if checkpoint_format(path) == "sharded":
        _load_sharded_weights(model, path / SHARDED_DIR, tp_rank, tp_size)
    else:
        _load_full_weights(model, path, tp_rank, tp_size)
    return model, cfg


__all__ = ["checkpoint_config", "is_training_checkpoint", "load_checkpoint_model"]
