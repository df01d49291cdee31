"""Saving and restoring a training run's checkpoint: which checkpoint ``resume`` names, what every rank writes,
and how a checkpoint is loaded into a ``TrainEngine`` at the current layout. The file format and its atomic
directories are ``kiln.pretrain.checkpoint``'s.

What the loop calls (every rank, at the same points):

* `restore_checkpoint(ckpt, engine, state, ctx)` before the first step, for ``resume``: either format;
* `save_train_checkpoint(manager, recipe, engine, state, ctx)` after a step: sharded; with
  ``checkpoint.async_save`` it returns once this rank's pieces are copied, and the files are written and the
  checkpoint committed in the background (the save at the last step, or when the run stops, is always
  synchronous: nothing is left to overlap it with);
* `wait_for_checkpoint(manager, ctx)` once the loop is done (and before anything reads the newest checkpoint or
  tears the process group down): blocks until a background save is committed. `save_train_checkpoint` calls it
  itself before a new save, so at most one save is in flight.

`save_full_train_checkpoint` writes the older full format (a gather, rank 0 writes everything): kept for
comparison (``benchmarks/checkpoint.py``) and to make checkpoints for tools that read ``model.safetensors``."""

from __future__ import annotations

import json
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
    """Load ``ckpt`` (sharded, or the older full format: told apart by the files present) into ``engine`` at the
    current layout and ``state``, and set this rank's RNG state. Returns the checkpoint's meta. Collective."""
    from kiln.pretrain.checkpoint import (
        META_FILE,
        SHARDED_DIR,
        CheckpointError,
        checkpoint_format,
        load_full_state,
        load_rng_state,
        load_train_state,
        rng_file,
    )

    fmt = checkpoint_format(ckpt)
    saved = load_train_state(ckpt)
    if fmt == "sharded":
        from kiln.pretrain.engine.sharded_state import load_sharded_state

        meta = json.loads((ckpt / META_FILE).read_text()) if (ckpt / META_FILE).is_file() else {}
        load_sharded_state(engine, ckpt / SHARDED_DIR)  # this layout's pieces only, into the live buffers
    else:
        model_state, optimizer_state, meta = load_full_state(ckpt)
        if optimizer_state is None:
            raise CheckpointError(f"{ckpt} has no optimizer state: it cannot be resumed (only used as initial weights)")
        engine.load_full_state(model_state, optimizer_state)
    state.restore(saved.checkpointed())
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
            f"resumed from {ckpt} (saved at {meta.get('layout', {}).get('name', '?')}, {fmt} format): "
            f"step {state.step}, {state.consumed_samples} samples consumed",
            flush=True,
        )
    return meta


def checkpoint_meta(recipe: TrainRecipe, state: TrainState, ctx, fmt: str) -> dict:
    """meta.json: the model config (export reads it), the layout the checkpoint was saved at, the recipe."""
    layout = ctx.layout
    return {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "format": fmt,
        "layout": {
            "tp": layout.tp,
            "pp": layout.pp,
            "dp": layout.dp,
            "world_size": ctx.world_size,
            "zero_stage": recipe.parallel.zero_stage,
            "precision": recipe.precision,
            "name": str(layout),
        },
        "model": to_dict(recipe.model),
        "recipe": recipe.to_dict(),
    }


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def wait_for_checkpoint(manager, ctx) -> Path | None:
    """Every rank: block until the save still being written in the background (``checkpoint.async_save``), if any,
    is on disk and committed. Returns its directory (None: nothing was pending). Collective when one was."""
    if not manager.pending:
        return None
    final = manager.wait()
    _barrier(ctx)  # rank 0 commits: the others return only once the checkpoint is complete
    if ctx.rank == 0:
        print(f"saved checkpoint {final} (in the background)", flush=True)
    return final


def _background_group(manager):
    """The gloo group background saves synchronise on: their collectives run in another thread and must never
    interleave with the training step's on the default group. One per manager, created on first use (a
    collective: every rank calls save at the same step)."""
    if manager.background_group is None:
        import torch.distributed as dist

        manager.background_group = dist.new_group(backend="gloo")
    return manager.background_group


def save_train_checkpoint(manager, recipe: TrainRecipe, engine, state: TrainState, ctx) -> Path:
    """Every rank: write the pieces of the model and optimizer state it holds (sharded, no gather), its RNG state,
    and on rank 0 the train state and meta; rank 0 commits. With ``checkpoint.async_save`` (and unless this is the
    run's last save) the pieces are copied and written in the background: the directory returned is committed
    only once `wait_for_checkpoint` returns. Collective."""
    from kiln.pretrain.checkpoint import META_FILE, SHARDED_DIR, save_rng_state, save_train_state
    from kiln.pretrain.engine.sharded_state import async_save_sharded_state, save_sharded_state

    wait_for_checkpoint(manager, ctx)  # one save in flight at a time
    step = state.step
    if ctx.rank == 0:
        manager.begin(step, clean=True)
    _barrier(ctx)
    tmp = manager.begin(step)
    save_rng_state(tmp, ctx.rank)  # before the pieces: DCP's last collective then implies every rank's is written
    if ctx.rank == 0:
        meta = checkpoint_meta(recipe, state, ctx, "sharded")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        save_train_state(tmp, state)
    last = state.should_stop or state.step >= recipe.train_steps
    if recipe.checkpoint.async_save and not last:
        written = async_save_sharded_state(engine, tmp / SHARDED_DIR, process_group=_background_group(manager))
        manager.commit_when_written(step, written.result, commit=ctx.rank == 0)
        return manager.final_dir(step)
    # DCP's save ends with rank 0 writing the index after every rank's files: rank 0 may commit at once
    save_sharded_state(engine, tmp / SHARDED_DIR)
    final = manager.commit(step) if ctx.rank == 0 else manager.final_dir(step)
    _barrier(ctx)
    if ctx.rank == 0:
        print(f"saved checkpoint {final}", flush=True)
    return final


def save_full_train_checkpoint(manager, recipe: TrainRecipe, engine, state: TrainState, ctx) -> Path:
    """The older full format: every rank gathers the full model and optimizer state, rank 0 writes them
    (``model.safetensors`` + ``optimizer.pt``), every rank its RNG state. Memory: the whole fp32 model and AdamW
    state (16 bytes per parameter) on every rank. Collective."""
    import torch.distributed as dist

    from kiln.pretrain.checkpoint import save_checkpoint

    wait_for_checkpoint(manager, ctx)
    model_state = engine.full_model_state()
    optimizer_state = engine.full_optimizer_state()
    meta = checkpoint_meta(recipe, state, ctx, "full")
    barrier = dist.barrier if ctx.world_size > 1 else None
    final = save_checkpoint(manager, state, model_state, optimizer_state, meta, rank=ctx.rank, barrier=barrier)
    if ctx.rank == 0:
        print(f"saved checkpoint {final}", flush=True)
    return final
