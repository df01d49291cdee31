"""Saving and restoring a training run's checkpoint: which checkpoint ``resume`` names, what every rank writes,
and how a checkpoint is loaded into a ``TrainEngine`` at the current layout. The file format and its atomic
directories are ``kiln.pretrain.checkpoint``'s."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.config import ConfigError, to_dict
from kiln.pretrain.callbacks.base import TrainState
from kiln.pretrain.recipe import TrainRecipe

log = logging.getLogger(__name__)


def resolve_resume(recipe: TrainRecipe) -> Path | None:
    """The checkpoint directory ``recipe.resume`` asks for (None: start from scratch). ``true``: the newest
    complete checkpoint under ``checkpoint.dir``, or None if there is none yet; a path: that checkpoint
    directory (an incomplete one falls back, with a warning, to the newest complete one beside it) or the newest
    complete checkpoint under that root. A path that holds none is a ConfigError."""
    from kiln.pretrain.checkpoint import MANIFEST, find_latest_checkpoint, is_complete, list_checkpoints

    r = recipe.resume
    if r is False or (isinstance(r, str) and r.strip().lower() in ("", "false", "no", "none")):
        return None
    if r is True or (isinstance(r, str) and r.strip().lower() in ("true", "yes", "latest", "auto")):
        ckpt = find_latest_checkpoint(recipe.checkpoint_dir)
        if ckpt is None:
            log.warning("resume: no complete checkpoint under %s; starting from step 0", recipe.checkpoint_dir)
        return ckpt
    path = Path(r)
    if not path.is_dir():
        raise ConfigError(f"resume: {path} does not exist (give a checkpoint directory or a checkpoint root)")
    looks_like_one = (path / MANIFEST).exists() or path.name.startswith("step_")
    if looks_like_one:
        if is_complete(path):
            return path
        ckpt = find_latest_checkpoint(path.parent)
        if ckpt is None:
            raise ConfigError(f"resume: {path} is incomplete (half-written) and {path.parent} has no complete one")
        log.warning("resume: %s is incomplete (half-written); falling back to %s", path, ckpt)
        return ckpt
    ckpt = find_latest_checkpoint(path)
    if ckpt is None:
        found = len(list_checkpoints(path))
        raise ConfigError(f"resume: no complete checkpoint under {path} ({found} incomplete step_* directories)")
    return ckpt


def restore_checkpoint(ckpt: Path, engine, state: TrainState, ctx) -> dict:
    """Load ``ckpt`` into ``engine`` (sliced for the current layout) and ``state``, and set this rank's RNG
    state. Returns the checkpoint's meta."""
    from kiln.pretrain.checkpoint import CheckpointError, load_full_state, load_rng_state, load_train_state, rng_file

    saved = load_train_state(ckpt)
    model_state, optimizer_state, meta = load_full_state(ckpt)
    if optimizer_state is None:
        raise CheckpointError(f"{ckpt} has no optimizer state: it cannot be resumed (only used as initial weights)")
    engine.load_full_state(model_state, optimizer_state)
    for name in ("step", "consumed_samples", "tokens", "nan_steps", "skipped_steps", "extra"):
        setattr(state, name, getattr(saved, name))
    saved_world = meta.get("layout", {}).get("world_size")
    if (ckpt / rng_file(ctx.rank)).is_file() and saved_world == ctx.world_size:
        load_rng_state(ckpt, ctx.rank)
    else:
        if ctx.rank == 0:
            log.warning(
                "%s was saved at world size %s, this run has %d: every rank takes rank 0's RNG state "
                "(the data order does not depend on it)",
                ckpt,
                saved_world,
                ctx.world_size,
            )
        load_rng_state(ckpt, 0)
    if ctx.rank == 0:
        print(
            f"resumed from {ckpt} (saved at {meta.get('layout', {}).get('name', '?')}): step {state.step}, "
            f"{state.consumed_samples} samples consumed",
            flush=True,
        )
    return meta


def save_train_checkpoint(manager, recipe: TrainRecipe, engine, state: TrainState, ctx) -> Path:
    """Every rank: gather the full model and optimizer state, rank 0 writes them, every rank its RNG state."""
    import torch.distributed as dist

    from kiln.pretrain.checkpoint import save_checkpoint

    model_state = engine.full_model_state()
    optimizer_state = engine.full_optimizer_state()
    layout = ctx.layout
    meta = {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "layout": {
            "tp": layout.tp,
            "pp": layout.pp,
            "dp": layout.dp,
            "world_size": ctx.world_size,
            "zero_stage": recipe.parallel.zero_stage,
            "name": str(layout),
        },
        "model": to_dict(recipe.model),
        "recipe": recipe.to_dict(),
    }
    barrier = dist.barrier if ctx.world_size > 1 else None
    final = save_checkpoint(manager, state, model_state, optimizer_state, meta, rank=ctx.rank, barrier=barrier)
    if ctx.rank == 0:
        print(f"saved checkpoint {final}", flush=True)
    return final
