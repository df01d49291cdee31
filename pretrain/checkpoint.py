"""Checkpoint files: atomic directories, a ``latest`` pointer, keep-last-K, RNG and train state, and the full
(unsharded) format older checkpoints use. (Pre-emption signals are the trainer's: ``kiln.pretrain.cancellation``.)

Layout under a run's checkpoint root::

    checkpoints/
      step_0000100/          one complete checkpoint
        state/               the model and optimizer state, sharded (torch.distributed.checkpoint's format):
          .metadata            every tensor's full shape and which chunk of it is in which file
          __0_0.distcp         the chunks rank 0 held (its TP slices, ZeRO fragments); one file per rank
          __1_0.distcp         ...
        meta.json            model config, the layout it was saved at (TP/PP/DP, ZeRO stage, precision), recipe
        train_state.json     TrainState: step, consumed samples (the data position), tokens, counters
        rng_00000.pt         RNG states of rank 0 (python, numpy, torch, cuda); one file per rank
        COMPLETE             written last, lists every file and its size
      step_0000200.tmp/      a checkpoint being written (or left by a crash: never read, cleaned up later)
      latest                 the name of the newest complete checkpoint ("step_0000100")

``state/`` holds the tensors under layout-independent names (``model.<name>``, ``optimizer.fp32.<name>``,
``optimizer.exp_avg.<name>``, ``optimizer.exp_avg_sq.<name>``, ``optimizer.step``; see
``kiln.pretrain.engine.sharded_state``): each rank wrote only what it holds, and any TP x PP x DP x ZeRO layout
reads its own pieces back. The full format of older checkpoints has, instead of ``state/``,
``model.safetensors`` (the full model, our parameter names) and ``optimizer.pt`` (the full optimizer state),
both written by rank 0 after a gather (`save_full_state`); it still loads (``checkpoint_format`` tells which).

Atomicity: everything is written into ``step_XXXXXXX.tmp``; `CheckpointManager.commit` then writes the
``COMPLETE`` manifest, fsyncs every file and the directory, renames the directory to ``step_XXXXXXX`` (a
rename is atomic on POSIX file systems), fsyncs the root and only then replaces ``latest`` (write to
``latest.tmp``, fsync, rename). A crash at any point leaves ``latest`` naming the previous complete
checkpoint. `find_latest_checkpoint` trusts nothing: it verifies the manifest (files present, sizes equal)
and falls back, with a warning, to the newest checkpoint that verifies.

Multi-rank saves: every rank writes its files into `CheckpointManager.begin(step)` (the same directory on a
shared file system), the loop runs a barrier, then rank 0 calls `commit`. A save still being written in the
background (``checkpoint.async_save``) is committed by `CheckpointManager.commit_when_written` once its files
are on disk; `CheckpointManager.wait` blocks until then.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.pretrain.callbacks.base import TrainState

log = logging.getLogger(__name__)

MANIFEST = "COMPLETE"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.json"
SHARDED_DIR = "state"  # DCP's files: .metadata + one __<rank>_0.distcp per rank
SHARDED_INDEX = f"{SHARDED_DIR}/.metadata"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing, incomplete, corrupt)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ------------------------------------------------------------------------------------------------ fsync helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------ verification


def is_complete(ckpt: str | os.PathLike) -> bool:
    """True iff ``ckpt`` has a manifest and every file it lists exists with the recorded size."""
    return _check_complete(Path(ckpt)) is None


def _check_complete(ckpt: Path) -> str | None:
    """None when complete, else why not."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} manifest ({e})"
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every ``step_XXXXXXX`` directory (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    Prefers the one ``latest`` names; a checkpoint that does not verify (half-written, files missing or
    truncated) is skipped with a warning and the next older complete one is used."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        candidate = root / name
        why = _check_complete(candidate) if candidate.is_dir() else "it does not exist"
        if why is None:
            # a newer complete checkpoint can exist if we crashed between the rename and the pointer update
            newest = [p for _, p in reversed(list_checkpoints(root)) if is_complete(p)]
            return newest[0] if newest else candidate
        log.warning("checkpoint %s (named by %s) is not usable: %s; falling back", candidate, pointer, why)
    for _, ckpt in reversed(list_checkpoints(root)):
        why = _check_complete(ckpt)
        if why is None:
            return ckpt
        log.warning("skipping incomplete checkpoint %s: %s", ckpt, why)
    return None


# ------------------------------------------------------------------------------------------------ manager


class CheckpointManager:
    """Atomic checkpoint directories under ``root`` with a ``latest`` pointer, keeping the last ``keep_last``."""

    def __init__(self, root: str | os.PathLike, keep_last: int | None = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self._pending: Future | None = None  # a save being written in the background (commit_when_written)
        self._executor: ThreadPoolExecutor | None = None
        # the process group background saves synchronise on (kiln.pretrain.checkpointing creates it on first use)
        self.background_group: Any = None

    def tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".tmp")

    def final_dir(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def begin(self, step: int, clean: bool = False) -> Path:
        """The temporary directory to write step ``step``'s files into (created; ``clean`` empties a leftover
        one first: call it with clean=True on one rank before the others write)."""
        tmp = self.tmp_dir(step)
        if clean and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Seal step ``step``: manifest, fsync, rename, ``latest``, prune. Returns the final directory."""
        tmp, final = self.tmp_dir(step), self.final_dir(step)
        if not tmp.is_dir():
            raise CheckpointError(f"nothing to commit: {tmp} does not exist (call begin({step}) and write first)")
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                _fsync_file(p)
                files[str(p.relative_to(tmp))] = p.stat().st_size
        manifest = tmp / MANIFEST
        with open(manifest, "w") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. pre-emption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic_text(self.root / LATEST, final.name + "\n")
        self.prune()
        return final

    def commit_when_written(self, step: int, written: Callable[[], object], *, commit: bool) -> None:
        """Finish step ``step`` in the background: a thread waits for ``written()`` to return (it blocks until this
        save's files are on disk) and then, with ``commit`` (on one rank only), commits it. One at a time: `wait`
        for the previous one first. The thread is not a daemon: the process waits for it before exiting."""
        if self._pending is not None:
            raise CheckpointError(f"a background save is still pending under {self.root}: call wait() first")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-checkpoint")

        def finish() -> Path:
            try:
                written()
                return self.commit(step) if commit else self.final_dir(step)
            except BaseException:
                log.exception("background save of step %d under %s failed", step, self.root)
                raise

        self._pending = self._executor.submit(finish)

    def wait(self) -> Path | None:
        """Block until the background save (if any) is written and, where this rank commits, committed. Returns its
        final directory (None: nothing was pending); re-raises its error."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(self, step: int, writer) -> Path:
        """Single-process convenience: ``writer(tmp_dir)`` writes the files, then `commit`."""
        tmp = self.begin(step, clean=True)
        writer(tmp)
        return self.commit(step)

    def prune(self) -> list[Path]:
        """Delete complete checkpoints beyond the newest ``keep_last`` and stale ``.tmp`` directories of older
        steps. Never deletes the checkpoint ``latest`` names."""
        removed: list[Path] = []
        latest = find_latest_checkpoint(self.root)
        complete = [p for _, p in list_checkpoints(self.root) if is_complete(p)]
        if self.keep_last is not None:
            for p in complete[: max(0, len(complete) - self.keep_last)]:
                if latest is not None and p == latest:
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        newest_step = int(_STEP_DIR.match(latest.name).group(1)) if latest is not None else -1
        for p in self.root.glob("step_*.tmp"):
            m = _STEP_DIR.match(p.name[: -len(".tmp")])
            if m and int(m.group(1)) <= newest_step:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    def latest(self) -> Path | None:
        return find_latest_checkpoint(self.root)


def checkpoint_format(ckpt: str | os.PathLike) -> str:
    """ "sharded" (``state/.metadata``) or "full" (``model.safetensors``, the older format); CheckpointError if
    ``ckpt`` has neither."""
    ckpt = Path(ckpt)
    if (ckpt / SHARDED_INDEX).is_file():
        return "sharded"
    if (ckpt / MODEL_FILE).is_file():
        return "full"
    raise CheckpointError(
        f"{ckpt}: no model state: expected {SHARDED_INDEX} (sharded checkpoint) or {MODEL_FILE} (full format)"
    )


# ------------------------------------------------------------------------------------------------ RNG + train state


def get_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng_{rank:05d}.pt"


def save_rng_state(ckpt_dir: str | os.PathLike, rank: int = 0) -> Path:
    path = Path(ckpt_dir) / rng_file(rank)
    torch.save(get_rng_state(), path)
    return path


def load_rng_state(ckpt_dir: str | os.PathLike, rank: int = 0) -> None:
    path = Path(ckpt_dir) / rng_file(rank)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint has no RNG state for rank {rank}")
    # our own file: python/numpy states are tuples of plain objects, which weights_only=True refuses
    set_rng_state(torch.load(path, weights_only=False))


def save_train_state(ckpt_dir: str | os.PathLike, state: TrainState) -> Path:
    path = Path(ckpt_dir) / TRAIN_STATE_FILE
    d = state.to_dict()
    d["should_stop"] = d["should_save"] = False  # flags of the saving run, not of the resumed one
    d["stop_reason"] = ""
    d["exit_code"] = 0
    path.write_text(json.dumps(d, indent=1, default=str) + "\n")
    return path


def load_train_state(ckpt_dir: str | os.PathLike) -> TrainState:
    path = Path(ckpt_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return TrainState.from_dict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------------ full state


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): copy the second and later aliases."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.contiguous()
    return out


def save_full_state(
    ckpt_dir: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None = None,
    meta: dict | None = None,
) -> None:
    """Write the full (unsharded) model state as safetensors, the optimizer state and ``meta`` into
    ``ckpt_dir`` (normally `CheckpointManager.begin`'s temporary directory)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file(_unshare(model_state), str(ckpt_dir / MODEL_FILE), metadata={"format": "pt"})
    if optimizer_state is not None:
        torch.save(optimizer_state, ckpt_dir / OPTIMIZER_FILE)
    (ckpt_dir / META_FILE).write_text(json.dumps(meta or {}, indent=1, default=str) + "\n")


def load_full_state(
    ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu", load_optimizer: bool = True
) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model state, optimizer state or None, meta) from a checkpoint written by `save_full_state`."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    model_path = ckpt_dir / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{model_path} not found")
    model_state = load_file(str(model_path), device=str(map_location))
    optimizer_state = None
    opt_path = ckpt_dir / OPTIMIZER_FILE
    if load_optimizer and opt_path.is_file():
        optimizer_state = torch.load(opt_path, map_location=map_location, weights_only=False)
    meta_path = ckpt_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model_state, optimizer_state, meta


# ------------------------------------------------------------------------------------------------ one call each


def save_checkpoint(
    manager: CheckpointManager,
    state: TrainState,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    meta: dict | None = None,
    *,
    rank: int = 0,
    barrier=None,
) -> Path:
    """Save step ``state.step`` from every rank: rank 0 writes the full model/optimizer state (when given), the
    train state and ``meta``; every rank writes its RNG state; rank 0 commits. ``barrier`` (e.g.
    ``torch.distributed.barrier``) is needed with several ranks; without it this is the single-process path.
    Returns the final checkpoint directory (on every rank)."""
    step = state.step
    if rank == 0:
        manager.begin(step, clean=True)
    if barrier is not None:
        barrier()
    tmp = manager.begin(step)
    save_rng_state(tmp, rank)
    if rank == 0:
        if model_state is not None:
            save_full_state(tmp, model_state, optimizer_state, meta)
        elif meta is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        save_train_state(tmp, state)
    if barrier is not None:
        barrier()
    final = manager.commit(step) if rank == 0 else manager.final_dir(step)
    if barrier is not None:
        barrier()
    return final


def resume_checkpoint(
    root: str | os.PathLike, rank: int = 0, load_model: bool = True, load_optimizer: bool = True
) -> tuple[Path, TrainState, dict | None, dict | None, dict] | None:
    """Restore from the newest complete checkpoint under ``root``: sets this rank's RNG state and returns
    ``(directory, train state, model state or None, optimizer state or None, meta)``; None when there is no
    checkpoint. At a different world size a rank without its own RNG file takes rank 0's (a warning says so:
    the data order does not depend on it, dropout-style randomness does)."""
    ckpt = find_latest_checkpoint(root)
    if ckpt is None:
        return None
    state = load_train_state(ckpt)
    if (ckpt / rng_file(rank)).is_file():
        load_rng_state(ckpt, rank)
    else:
        log.warning("%s has no RNG state for rank %d (saved at another world size): using rank 0's", ckpt, rank)
        load_rng_state(ckpt, 0)
    model_state = optimizer_state = None
    meta: dict = {}
    if load_model and (ckpt / MODEL_FILE).is_file():
        model_state, optimizer_state, meta = load_full_state(ckpt, load_optimizer=load_optimizer)
    elif (ckpt / META_FILE).is_file():
        meta = json.loads((ckpt / META_FILE).read_text())
    return ckpt, state, model_state, optimizer_state, meta
