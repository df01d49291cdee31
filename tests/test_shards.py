"""`Shards` and the DCP files in one process: flat ZeRO-style fragments tile the tensor, a save cut one way loads
cut another way bitwise, views are written in place and not cloned, and a checkpoint that does not fit the model
is an error naming the tensor."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kiln.pretrain import sharded_io
from kiln.pretrain.checkpoint import CheckpointError
from kiln.pretrain.shards import Shards, exact_storage, flat_range_boxes


def _covered(shape, boxes) -> list[int]:
    """The flat indices the boxes cover, in box order (row-major within each box)."""
    index = torch.arange(math.prod(shape)).view(shape)
    out = []
    for offset, size in boxes:
        out += index[tuple(slice(o, o + s) for o, s in zip(offset, size))].reshape(-1).tolist()
    return out


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5), (1, 9), (8, 1)])
def test_flat_range_boxes_tile_every_range_in_order(shape):
    n = math.prod(shape)
    rng = random.Random(0)
    ranges = [(0, n), (0, 1), (n - 1, n)] + [tuple(sorted(rng.sample(range(n + 1), 2))) for _ in range(40)]
    for start, stop in ranges:
        boxes = flat_range_boxes(shape, start, stop)
        assert _covered(shape, boxes) == list(range(start, stop)), (shape, start, stop)
        assert len(boxes) <= 2 * len(shape) - 1  # a tail, whole blocks, a head per dimension
    assert flat_range_boxes(shape, 3, 3) == []


def _fragments(full: torch.Tensor, cuts: list[int], flat_sources: list[torch.Tensor]) -> list[Shards]:
    """``full`` cut at ``cuts`` of its flattened form, each part a view into its own flat buffer (as ZeRO does)."""
    bounds = [0, *cuts, full.numel()]
    out = []
    for (a, b), buf in zip(zip(bounds, bounds[1:]), flat_sources):
        view = buf.narrow(0, 3, b - a)  # not at the buffer's start: storage larger than the view
        view.copy_(full.reshape(-1)[a:b])
        out.append(Shards.from_flat(full.shape, local_shape=full.shape, local_offset=[0, 0], start=a, flat=view))
    return out


def test_a_save_cut_one_way_loads_cut_another_way_bitwise(tmp_path):
    torch.manual_seed(0)
    full = {"w": torch.randn(6, 10), "b": torch.randn(1, 7)}
    # saved as the fragments of 3 "ranks" (one process writes them all)
    bufs = [torch.zeros(64) for _ in range(3)]
    pieces = [piece for s in _fragments(full["w"], [13, 41], bufs) for piece in s.pieces]
    bias_cols = [((0, 0), full["b"][:, :4].clone()), ((0, 4), full["b"][:, 4:].clone())]
    sd = {"w": Shards((6, 10), pieces), "b": Shards((1, 7), bias_cols), "step": torch.tensor(5)}
    sharded_io.save(sd, tmp_path, no_dist=True)

    # loaded as a TP-style row slice, then as a ZeRO-style fragment of another cut, into views of a live buffer
    target = torch.full((80,), -1.0)
    rows = target.narrow(0, 0, 30).view(3, 10)  # rows 3..5
    bias, step = torch.zeros(1, 7), torch.tensor(0)
    sharded_io.load(
        {"w": Shards((6, 10), [((3, 0), rows)]), "b": Shards((1, 7), [((0, 0), bias)]), "step": step},
        tmp_path,
        no_dist=True,
    )
    frag = target.narrow(0, 40, 25)  # flat elements 7..31
    into = Shards.from_flat((6, 10), local_shape=(6, 10), local_offset=[0, 0], start=7, flat=frag)
    assert len(into.pieces) == 3  # the tail of row 0, rows 1-2, the head of row 3
    sharded_io.load({"w": into}, tmp_path, no_dist=True)
    assert torch.equal(target[:30].view(3, 10), full["w"][3:])  # written in place, bitwise
    assert torch.equal(target[40:65], full["w"].reshape(-1)[7:32])
    assert torch.equal(target[30:40], torch.full((10,), -1.0)) and torch.equal(target[65:], torch.full((15,), -1.0))
    assert torch.equal(bias, full["b"]) and int(step) == 5


def test_views_get_their_own_storage_so_dcp_does_not_clone_them():
    flat = torch.arange(20, dtype=torch.float32)
    view = flat.narrow(0, 5, 6).view(2, 3)
    own = exact_storage(view)
    assert own.untyped_storage().nbytes() == own.nbytes == 24 and own.data_ptr() == view.data_ptr()
    own.fill_(-1)
    assert flat[5:11].tolist() == [-1.0] * 6 and flat[11] == 11
    bf = torch.zeros(10, dtype=torch.bfloat16).narrow(0, 2, 4)
    assert exact_storage(bf).dtype == torch.bfloat16 and exact_storage(bf).untyped_storage().nbytes() == 8
    with pytest.raises(TypeError, match="no tensor operations"):
        Shards((20,), [((0,), flat)]).clone()


def test_a_checkpoint_that_does_not_fit_names_the_tensor(tmp_path):
    sharded_io.save({"model.w": torch.zeros(4, 3), "optimizer.step": torch.tensor(1)}, tmp_path, no_dist=True)
    with pytest.raises(CheckpointError, match=r"'model.w' has shape \[4, 3\] in the checkpoint, the model expects"):
        sharded_io.load({"model.w": torch.zeros(4, 5)}, tmp_path, no_dist=True)
    with pytest.raises(CheckpointError, match="has no tensor 'model.v'"):
        sharded_io.load({"model.v": torch.zeros(4, 3)}, tmp_path, no_dist=True)
    with pytest.raises(CheckpointError, match="not found"):
        sharded_io.read_metadata(tmp_path / "nope")
    files = sharded_io.chunks_by_file(tmp_path)
    assert sorted(files) == ["__0_0.distcp"]
    assert sorted(files["__0_0.distcp"]) == [("model.w", (0, 0), (4, 3)), ("optimizer.step", (), ())]
