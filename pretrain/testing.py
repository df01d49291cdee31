"""Helpers for tests of the model across process groups on CPU (gloo), in the spirit of OLMo-core's
``run_distributed_test``: spawn N ranks, run a function on each, collect what each returns."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, *, port: int, tp: int, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        if tp:
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        # serialised to bytes: tensors sent as-is travel as shared-memory handles that die with this process
        buf = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report every failure to the parent instead of hanging it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, tp: int = 0, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results by rank.

    ``tp`` > 0 also initialises megatron parallel_state with that tensor-parallel size. ``fn`` must be a
    module-level function (it is pickled), and its result must be picklable (tensors are fine).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size),
            kwargs={"port": port, "tp": tp, "fn": fn, "args": args, "results": results},
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish in {timeout}s ({len(out)} ranks returned)")
            if results.empty():
                if all(not p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError("every rank exited without reporting a result (crashed?)")
                time.sleep(0.05)
                continue
            rank, status, value = results.get()
            if status == "ok":
                import torch

                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]


@contextlib.contextmanager
def single_process_group(tp_parallel_state: bool = True) -> Iterator[Any]:
    """A 1-rank gloo group in this process (no port needed), with megatron parallel_state at TP=1 when asked;
    torn down on exit. Yields the TP group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps = None
    try:
        if tp_parallel_state:
            from megatron.core import parallel_state as ps

            ps.initialize_model_parallel(tensor_model_parallel_size=1)
            yield ps.get_tensor_model_parallel_group()
        else:
            yield dist.group.WORLD
    finally:
        if ps is not None:
            ps.destroy_model_parallel()
        dist.destroy_process_group()


@functools.cache
def smollm2_reference():
    """(transformers model loaded from the SmolLM2-135M-Instruct GGUF, KilnLlama imported from it, ModelConfig),
    both fp32 in eval mode. Loaded once per process (~15-50 s on 2 cores): test modules share it."""
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.pretrain.hf_io import import_hf_model, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model, cfg = import_hf_model(hf, source=str(gguf))
    return hf, model.eval(), cfg


@functools.cache
def smollm2_tokenizer():
    from kiln.pretrain.hf_io import load_tokenizer

    return load_tokenizer("smollm2")


__all__ = ["free_port", "run_distributed", "single_process_group", "smollm2_reference", "smollm2_tokenizer"]
