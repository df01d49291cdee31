"""The full (gathered) optimizer state of a ``TrainEngine``, independent of the layout it was trained at: the
legacy checkpoint format (``model.safetensors`` + ``optimizer.pt``) and the full-gather side of
``benchmarks/checkpoint.py``. Sharded checkpoints do not gather (``kiln.pretrain.engine.sharded_state``).

A full optimizer state holds, per parameter under its KilnLlama (= Hugging Face) name, the full-size fp32 AdamW
state ``exp_avg`` / ``exp_avg_sq``, the fp32 master weight ``fp32`` (the weight itself in fp32 training, the
master copy with bf16) and ``step``. Where DeepSpeed keeps this rank's part of each (a TP slice, or a flat ZeRO
fragment of it) is ``kiln.pretrain.engine.deepspeed_adapter``'s to say.

Gathering: each fragment goes into a zero buffer of the (TP-local) parameter's size and the buffers are summed
over the group the fragments are spread over (DP for ZeRO 1/2, the partition group for ZeRO 3); TP slices are
concatenated over the TP group (``kiln.parallel.tensor_parallel.tp_split_dim``); pipeline stages exchange their dicts.
Loading slices the full tensors for the current layout: the TP slice (``tp_slice``), then this rank's fragment.
So a state saved at TP2 x PP2 loads at PP2 x DP2 with ZeRO 1, or at 1 rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kiln.parallel.pipeline import model_param_name
from kiln.parallel.tensor_parallel import tp_slice, tp_split_dim
from kiln.pretrain.engine import deepspeed_adapter as ds

if TYPE_CHECKING:
    from kiln.pretrain.engine.core import TrainEngine

ADAM_KEYS = ds.ADAM_KEYS
MASTER = "fp32"  # the fp32 master weight, stored next to the Adam moments


def local_named_params(engine: TrainEngine) -> list[tuple[str, torch.nn.Parameter]]:
    """(KilnLlama name, parameter) of every parameter this rank holds, in module order (the same order on
    every rank of a DP / TP group, which the collectives below rely on). The one place checkpoints learn which
    parameter is which."""
    n_layers = engine.cfg.num_hidden_layers
    out = []
    for name, p in engine.module.named_parameters():
        out.append((model_param_name(name, n_layers) if engine.pipelined else name, p))
    return out


def optimizer_step(engine: TrainEngine) -> int:
    """AdamW's step count (0 before the first update), the same on every rank. Collective."""
    steps = [float(s["step"]) for s in ds.inner_optimizer(engine.engine.optimizer).state.values() if "step" in s]
    local = torch.tensor([max(steps) if steps else 0.0], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        local = local.to(engine.ctx.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return int(local.item())


def ensure_adam_state(engine: TrainEngine, step: int) -> None:
    """Create AdamW's per-tensor state (zero moments, as AdamW's own lazy init) where it does not exist yet, so that
    a checkpoint can be read into it, and set every step count to ``step``."""
    opt = engine.engine.optimizer
    inner = ds.inner_optimizer(opt)
    for t in ds.optimizer_state_tensors(opt):
        state = inner.state[t]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        if "step" not in state:
            # as AdamW's lazy init: the fused kernel reads the step count on the parameter's device
            fused = bool(inner.defaults.get("fused"))
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=t.device if fused else "cpu")
        if torch.is_tensor(state["step"]):
            state["step"].fill_(float(step))
        else:
            state["step"] = float(step)


# ------------------------------------------------------------------------------------------------ read


def _gathered(engine: TrainEngine, p: torch.nn.Parameter, key: str | None, started: bool) -> torch.Tensor:
    """This rank's TP slice of ``p``'s fp32 master (key None) or AdamW state ``key``, from every fragment.
    Collective over the fragments' group. Zeros for the moments before the first update (AdamW's start)."""
    opt = engine.engine.optimizer
    frag, group = ds.fragment(opt, p), ds.fragment_group(opt, p)
    buffer = torch.zeros(ds.local_numel(p), dtype=torch.float32, device=engine.ctx.device)
    if frag is not None and (key is None or started):
        src = frag.owner.data if key is None else ds.inner_optimizer(opt).state.get(frag.owner, {}).get(key)
        if src is not None:  # None: a tensor without state yet (AdamW starts it at zero)
            buffer.narrow(0, frag.start, frag.numel).copy_(frag.of(src))
    if group is not None:
        dist.all_reduce(buffer, group=group)
    return buffer.view(ds.local_shape(p))


@torch.no_grad()
def full_optimizer_state(engine: TrainEngine) -> dict:
    """``{"step": int, "params": {name: {"exp_avg", "exp_avg_sq", "fp32": full fp32 CPU tensor, "step": int}}}``
    on every rank, whatever the layout. All ranks must call it."""
    step = optimizer_step(engine)
    tp = engine.ctx.layout.tp
    local: dict[str, dict] = {}
    for name, p in local_named_params(engine):
        entry: dict = {"step": step}
        for key in (None, *ADAM_KEYS):
            value = _gathered(engine, p, key, started=step > 0)
            dim = tp_split_dim(name)
            if tp > 1 and dim is not None:
                value = value.contiguous()
                parts = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(parts, value, group=engine.ctx.tp_group)
                value = torch.cat(parts, dim=dim)
            entry[MASTER if key is None else key] = value.float().cpu().clone()
        local.setdefault(name, entry)  # the tied embedding's second copy on the last stage: same values
    if engine.ctx.layout.pp > 1:
        stages: list[dict] = [{} for _ in range(engine.ctx.layout.pp)]
        dist.all_gather_object(stages, local, group=engine.ctx.pp_group)
        local = {name: e for stage in stages for name, e in stage.items()}
    return {"step": step, "params": local}


# ------------------------------------------------------------------------------------------------ write


def _write_fragment(engine: TrainEngine, p: torch.nn.Parameter, key: str | None, local: torch.Tensor) -> None:
    """Write this rank's fragment of the TP-local ``local`` into the fp32 master (key None) or AdamW state ``key``."""
    opt = engine.engine.optimizer
    frag = ds.fragment(opt, p)
    if frag is None:
        return
    target = frag.owner.data if key is None else ds.inner_optimizer(opt).state[frag.owner][key]
    frag.of(target).copy_(local.reshape(-1).narrow(0, frag.start, frag.numel))


@torch.no_grad()
def load_full_state(engine: TrainEngine, model_state: dict[str, torch.Tensor], optimizer_state: dict | None) -> None:
    """Load full-size weights (and, when given, the full optimizer state of `full_optimizer_state`) into this
    rank's slices. The weights the model computes with are set from ``model_state`` and the fp32 masters from
    the optimizer state's ``fp32`` entries (else from ``model_state``); without ZeRO the weight is the master.
    Raises KeyError / ValueError naming the parameter when the checkpoint does not fit the model."""
    tp, tp_rank = engine.ctx.layout.tp, engine.ctx.tp_rank
    params = local_named_params(engine)
    entries = optimizer_state["params"] if optimizer_state is not None else {}
    for name, _ in params:
        if name not in model_state:
            raise KeyError(f"the checkpoint has no weight {name!r}")
        if optimizer_state is not None and name not in entries:
            raise KeyError(f"the checkpoint's optimizer state has no entry for {name!r}")
    if optimizer_state is not None:
        ensure_adam_state(engine, int(optimizer_state["step"]))
    opt = engine.engine.optimizer
    for name, p in params:
        entry = entries.get(name)
        master = entry[MASTER] if entry is not None and MASTER in entry else model_state[name]
        weights = master if ds.param_kind(p) == "plain" else model_state[name]
        local = tp_slice(name, weights, tp_rank, tp).to(device=engine.ctx.device, dtype=torch.float32)
        if tuple(local.shape) != ds.local_shape(p):
            raise ValueError(f"{name}: checkpoint slice has shape {tuple(local.shape)}, the model {ds.local_shape(p)}")
        held = ds.weight_fragment(opt, p)
        if held is not None:  # the weights the model computes with (bf16 or fp32)
            start, view = held
            view.copy_(local.reshape(-1).narrow(0, start, view.numel()))
        if ds.param_kind(p) != "plain":
            _write_fragment(engine, p, None, tp_slice(name, master, tp_rank, tp).to(engine.ctx.device, torch.float32))
        if entry is not None:
            for key in ADAM_KEYS:
                value = tp_slice(name, entry[key], tp_rank, tp).to(engine.ctx.device, torch.float32)
                _write_fragment(engine, p, key, value)
    ds.unlink_optimizer_views(opt)  # ZeRO 1/2 re-links its views of the state at the next step


__all__ = ["ensure_adam_state", "full_optimizer_state", "load_full_state", "local_named_params", "optimizer_step"]
