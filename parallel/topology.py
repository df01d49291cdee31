"""Process groups for TP x PP x DP, from megatron-core ``parallel_state`` and DeepSpeed's pipeline topology.

Two libraries each build their own groups: megatron's TP layers and vocab-parallel loss use ``parallel_state``,
DeepSpeed's pipeline engine uses ``PipeModelDataParallelTopology``. Both order ranks TP fastest, then DP, then
PP (megatron ``order="tp-dp-pp"`` is its default once context/expert parallelism are 1; DeepSpeed's axes are
``[pipe, data, model]``). ``init_parallel`` builds both and checks, on every rank, that the TP / DP / PP groups
of one equal the other's, so a mismatch is an error at start-up instead of silently wrong gradients.

Collective timeouts: the default group, megatron's groups and the groups DeepSpeed creates later all get
``timeout_s``, so a dead or stuck rank ends the job with a timeout error instead of a hang.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln.parallel.layout import Layout


@dataclass
class ParallelContext:
    """This rank's place in the layout and the groups it talks over."""

    layout: Layout
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any  # None at TP=1: the model then runs plain local layers (no TP collectives)
    dp_group: Any
    pp_group: Any
    topology: Any  # deepspeed PipeModelDataParallelTopology
    mpu: MegatronMPU
    device: torch.device

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


class MegatronMPU:
    """megatron ``parallel_state`` under the method names DeepSpeed's engine and ZeRO optimizers call on an
    ``mpu``. ``parallel_state`` itself lacks ``get_model_parallel_rank`` / ``_world_size``, which DeepSpeed
    uses; "model parallel" there means TP x PP (the ranks holding one replica), as in megatron."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    # tensor parallel (DeepSpeed's bwc helpers prefer these names)
    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    # pipeline
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.ps.get_data_parallel_group())

    # model parallel = TP x PP
    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.ps.get_model_parallel_group())


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a plain ``python`` process is rank 0 of 1.
    Fills the variables torch/DeepSpeed read so that a torchrun-free single process works too."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the 1-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    return rank, world, local


def _set_default_timeout(timeout: timedelta) -> None:
    """Groups created without an explicit timeout (DeepSpeed's pipeline grid, tied-weight and ZeRO groups) take
    torch's backend default (30 min); make it ours. The helper is private torch API, hence the guard."""
    import torch.distributed.distributed_c10d as c10d

    if hasattr(c10d, "_get_default_timeout"):
        c10d._get_default_timeout = lambda backend: timeout


def init_parallel(layout: Layout, backend: str | None = None, timeout_s: float = 600.0) -> ParallelContext:
    """Start (or reuse) the default process group, build megatron's and DeepSpeed's groups for ``layout`` and
    check they agree. ``backend``: None = nccl with CUDA, else gloo. Call ``destroy_parallel`` before building
    another layout in the same processes."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    _, _, local_rank = launch_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    _set_default_timeout(timeout)
    if dist.is_initialized():  # started by a test harness: DeepSpeed adopts the existing group
        backend = dist.get_backend()
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    world = dist.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"layout {layout} needs {layout.world_size} processes, the job has {world}")
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        distributed_timeout_minutes=timeout_s / 60,  # megatron builds timedelta(minutes=...): a float is fine
        create_gloo_process_groups=False,
    )
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    rank = dist.get_rank()
    check_layout_agreement(rank, topology)
    coord = topology.get_coord(rank)
    return ParallelContext(
        layout=layout,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        tp_rank=coord.model,
        pp_rank=coord.pipe,
        dp_rank=coord.data,
        tp_group=ps.get_tensor_model_parallel_group() if layout.tp > 1 else None,
        dp_group=ps.get_data_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        topology=topology,
        mpu=MegatronMPU(),
        device=device,
    )


def check_layout_agreement(rank: int, topology) -> None:
    """Raise if megatron's TP / DP / PP groups containing ``rank`` differ from DeepSpeed's topology axes."""
    from megatron.core import parallel_state as ps

    coord = topology.get_coord(rank)
    mine = {
        "model": (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), coord.model),
        "data": (ps.get_data_parallel_group(), ps.get_data_parallel_rank(), coord.data),
        "pipe": (ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank(), coord.pipe),
    }
    for axis, (group, ps_rank, ds_rank) in mine.items():
        ps_ranks = sorted(dist.get_process_group_ranks(group))
        ds_ranks = next(sorted(g) for g in topology.get_axis_comm_lists(axis) if rank in g) if ps_ranks else []
        if ps_ranks != ds_ranks or ps_rank != ds_rank:
            raise RuntimeError(
                f"rank {rank}: megatron and DeepSpeed disagree on the {axis} axis: megatron group {ps_ranks} "
                f"(rank {ps_rank}), DeepSpeed group {ds_ranks} (rank {ds_rank})"
            )


def destroy_parallel(keep_default_group: bool = True) -> None:
    """Tear down megatron's groups (and the default group unless kept), so another layout can be built."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if not keep_default_group and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["MegatronMPU", "ParallelContext", "check_layout_agreement", "destroy_parallel", "init_parallel"]
