"""`Shards`: the pieces of one full-shape tensor that this rank holds, in a form torch.distributed.checkpoint (DCP)
saves and loads in place.

Why not DTensor: a ZeRO 1/2/3 partition is a contiguous range of the *flattened* parameter, which cuts through
rows (a matrix fragment is up to three rectangular boxes: the tail of a row, whole rows, the head of a row);
DTensor placements describe only even splits along dimensions. `Shards` lists boxes ``(offset, view)`` of the
full tensor explicitly and implements DCP's ``_Checkpointable`` hooks (``__create_write_items__``,
``__create_chunk_list__``, ``__get_tensor_shard__``, as megatron-core's ``LocalShardsContainer`` does): DCP then
writes each box as a chunk of the global tensor, dedups boxes that several ranks hold (replicated weights), and on
load reads exactly the boxes this rank asks for, into the views: no gather on save, no full-size copy on load.

Each view on the CPU gets storage of exactly its own size (`exact_storage`): DCP's file writer otherwise clones
every tensor whose storage is larger than itself (a view into a flat ZeRO buffer) and keeps all the clones of a
file alive until the file is written (a full copy of this rank's state, pytorch#195982).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, size)


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """Boxes ``(offset, size)`` that tile the row-major flat range ``[start, stop)`` of a tensor of ``shape``, in
    flat order: a tail of a row, whole rows, a head of a row (recursively for more dimensions)."""
    shape = tuple(shape)
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner

    def within_row(row: int, lo: int, hi: int) -> list[Box]:
        return [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], lo, hi)]

    if first == last:
        return within_row(first, start - first * inner, stop - first * inner)
    boxes: list[Box] = []
    if start % inner:
        boxes += within_row(first, start % inner, inner)
        first += 1
    whole_end = stop // inner
    if whole_end > first:
        boxes.append(((first, *[0] * (len(shape) - 1)), (whole_end - first, *shape[1:])))
    if stop % inner:
        boxes += within_row(whole_end, 0, stop % inner)
    return boxes


def exact_storage(t: torch.Tensor) -> torch.Tensor:
    """A tensor aliasing ``t``'s memory whose storage is exactly ``t`` (CPU, contiguous); else ``t`` itself. DCP
    then writes it without cloning it (see the module docstring); a load writes through it into ``t``."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() == t.nbytes:
        return t
    raw = torch.from_numpy(t.reshape(-1).view(torch.uint8).numpy())  # numpy: no bfloat16, so bytes
    return raw.view(t.dtype).view(t.shape)


class Shards(torch.Tensor):
    """Pieces ``[(offset in the full tensor, view)]`` of a tensor of ``full_shape``. The views alias live buffers
    (weights, DeepSpeed's flat fp32 partitions, AdamW moments), so a save reads and a load writes them in place.
    A tensor subclass only because DCP's lookups insist on ``isinstance(obj, torch.Tensor)``; it supports no
    tensor operations (any op raises TypeError)."""

    @staticmethod
    def __new__(cls, full_shape: Sequence[int], pieces: Sequence[tuple[Sequence[int], torch.Tensor]]):
        if not pieces:
            raise ValueError("Shards needs at least one piece (leave a tensor this rank holds none of out)")
        first = pieces[0][1]
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(full_shape), dtype=first.dtype, device=first.device)

    def __init__(self, full_shape: Sequence[int], pieces: Sequence[tuple[Sequence[int], torch.Tensor]]):
        self.full_shape = torch.Size(full_shape)
        self.pieces = [(torch.Size(offset), exact_storage(view)) for offset, view in pieces]
        for offset, view in self.pieces:
            if len(offset) != len(self.full_shape) or any(
                o + s > f for o, s, f in zip(offset, view.shape, self.full_shape)
            ):
                raise ValueError(f"piece at {tuple(offset)} of shape {tuple(view.shape)} is outside {self!r}")

    @classmethod
    def from_flat(
        cls,
        full_shape: Sequence[int],
        *,
        local_shape: Sequence[int],
        local_offset: Sequence[int],
        start: int,
        flat: torch.Tensor,
    ) -> Shards:
        """``flat`` holds elements ``start ... start + len(flat)`` of the flattened local tensor of ``local_shape``
        (a TP slice), which sits at ``local_offset`` in the full tensor."""
        pieces, pos = [], 0
        for offset, size in flat_range_boxes(local_shape, start, start + flat.numel()):
            n = math.prod(size)
            pieces.append(([o + lo for o, lo in zip(offset, local_offset)], flat.narrow(0, pos, n).view(size)))
            pos += n
        return cls(full_shape, pieces)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"Shards is a checkpoint container and supports no tensor operations (got {func})")

    def __repr__(self) -> str:
        boxes = [(tuple(o), tuple(t.shape)) for o, t in self.pieces] if hasattr(self, "pieces") else "?"
        return f"Shards({tuple(self.shape)}, {boxes})"

    def numel_held(self) -> int:
        return sum(t.numel() for _, t in self.pieces)

    # --- torch.distributed.checkpoint's _Checkpointable hooks ---

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, offset, i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offset, sizes=view.size()),
                    properties=TensorProperties.create_from_tensor(view),
                    size=self.full_shape,
                ),
            )
            for i, (offset, view) in enumerate(self.pieces)
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offset, sizes=view.size()) for offset, view in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.pieces) and self.pieces[index.index][0] == index.offset:
            return self.pieces[index.index][1]
        for offset, view in self.pieces:
            if offset == index.offset:
                return view
        raise ValueError(f"{index.fqn}: this rank holds no piece at offset {tuple(index.offset or ())}")


__all__ = ["Shards", "exact_storage", "flat_range_boxes"]
