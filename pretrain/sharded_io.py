"""Reading and writing the sharded part of a checkpoint (the ``state/`` directory) with
torch.distributed.checkpoint (DCP), whatever produced the state dict.

A state dict maps layout-independent names to `kiln.pretrain.shards.Shards` (the boxes of the full tensor this
rank holds) or to plain tensors (replicated: DCP writes them once). On disk (DCP's own format)::

    state/
      .metadata             every tensor's full shape and dtype, and which chunk (offset, size) is where
      __0_0.distcp          the chunks rank 0 wrote; one file per rank that wrote any
      __1_0.distcp          ...

`save` and `load` are collective over the process group; `load(..., no_dist=True)` and `read_full` read in one
process with no process group (export to Hugging Face). `async_save` copies this rank's pieces first and writes
them in a background thread, synchronising on its own process group so that its collectives never interleave
with the training step's.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from kiln.pretrain.checkpoint import CheckpointError
from kiln.pretrain.shards import Shards

METADATA_FILE = ".metadata"  # DCP's global index, written by the coordinator (rank 0) last


def _writer(directory: str | os.PathLike) -> dcp.FileSystemWriter:
    # One file per rank: `Shards` gives each view storage of its own size, so DCP keeps no clones of a file's
    # tensors (see kiln.pretrain.shards) and one file per rank costs no memory (per-tensor files would be ~4 x
    # the number of parameters). sync_files: fsync each file before the metadata names it.
    return dcp.FileSystemWriter(str(directory), single_file_per_rank=True, sync_files=True)


def save(state_dict: dict, directory: str | os.PathLike, *, process_group=None, no_dist: bool = False) -> None:
    """Collective (unless ``no_dist``: one process writes everything): every rank writes its own pieces into
    ``directory``, rank 0 also the ``.metadata``."""
    dcp.save(state_dict, storage_writer=_writer(directory), process_group=process_group, no_dist=no_dist)


class SnapshotStager:
    """DCP's async stager for `Shards` dicts (its default stager does not know the wrapper): copy every piece to
    fresh CPU memory, so that training may change the live buffers while the copy is written."""

    should_synchronize_after_execute = False

    def stage(self, state_dict: dict) -> dict:
        return {key: snapshot(value) for key, value in state_dict.items()}

    def synchronize_staging(self) -> None:
        pass  # `stage` copies synchronously: when it returns there is nothing left to wait for

    def close(self) -> None:
        pass  # the stager holds no pool, stream or pinned buffer to release


def snapshot(value):
    """A CPU copy of a `Shards` (piece by piece) or tensor; other values as they are."""
    if isinstance(value, Shards):
        return Shards(value.full_shape, [(o, t.detach().to("cpu", copy=True)) for o, t in value.pieces])
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    return value


def async_save(state_dict: dict, directory: str | os.PathLike, *, process_group) -> Future:
    """Collective (the copy is taken before it returns): snapshot this rank's pieces, then write them in a
    background thread. ``process_group`` must be a gloo group used by nothing else while the save runs. The
    future completes on every rank after the ``.metadata`` is written (DCP's last collective), i.e. once every
    rank's files are on disk."""
    future = dcp.async_save(
        state_dict, storage_writer=_writer(directory), process_group=process_group, async_stager=SnapshotStager()
    )
    return getattr(future, "upload_completion", future)


def read_metadata(directory: str | os.PathLike) -> Metadata:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a sharded checkpoint, or its save did not finish")
    return dcp.FileSystemReader(str(directory)).read_metadata()


def full_shapes_of(metadata: Metadata, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Full shape of every tensor named ``prefix...`` in the checkpoint, under its name without the prefix."""
    return {
        key[len(prefix) :]: tuple(md.size)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }


def check_fits(state_dict: dict, metadata: Metadata, directory: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first tensor ``state_dict`` asks for that the checkpoint lacks or holds at
    another full shape (before any collective, so every rank fails alike with a readable message)."""
    saved = metadata.state_dict_metadata
    for key, value in state_dict.items():
        md = saved.get(key)
        if md is None:
            raise CheckpointError(f"{directory}: the checkpoint has no tensor {key!r} (saved: {len(saved)} entries)")
        if isinstance(md, BytesStorageMetadata) or not torch.is_tensor(value):
            continue
        if tuple(md.size) != tuple(value.shape):
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {list(md.size)} in the checkpoint, the model expects "
                f"{list(value.shape)}"
            )


def load(state_dict: dict, directory: str | os.PathLike, *, no_dist: bool = False) -> None:
    """Read into ``state_dict``'s views and tensors in place: each rank reads only the chunks overlapping the
    pieces it asks for. Collective unless ``no_dist``."""
    check_fits(state_dict, read_metadata(directory), directory)
    dcp.load(state_dict, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=no_dist)


def chunks_by_file(directory: str | os.PathLike) -> dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Which file holds which chunk: ``{file name: [(tensor name, offset, size), ...]}`` (for tests and tools)."""
    metadata = read_metadata(directory)
    out: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        md = metadata.state_dict_metadata[index.fqn]
        if isinstance(md, TensorStorageMetadata):
            chunk = next(c for c in md.chunks if tuple(c.offsets) == tuple(index.offset))
            entry = (index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))
        else:
            entry = (index.fqn, (), ())
        out.setdefault(info.relative_path, []).append(entry)
    return out


__all__ = [
    "METADATA_FILE",
    "SnapshotStager",
    "async_save",
    "check_fits",
    "chunks_by_file",
    "full_shapes_of",
    "load",
    "read_metadata",
    "save",
    "snapshot",
]
