"""Full optimizer state in and out of a ``TrainEngine``, independent of the layout it was trained at.

A checkpoint holds, per parameter under its KilnLlama (= Hugging Face) name, the full-size fp32 AdamW state
``exp_avg`` / ``exp_avg_sq``, the fp32 master weight ``fp32`` (the weight itself in fp32 training, the master
copy with bf16) and ``step``. Where DeepSpeed keeps these:

* no ZeRO (stage 0): the wrapped ``torch.optim.AdamW`` keyed by the model parameter itself;
* ZeRO 1/2 (and the ``BF16_Optimizer`` DeepSpeed uses for ZeRO 1 with bf16): one flat fp32 partition per
  parameter group and DP rank (``single_partition_of_fp32_groups`` / ``fp32_groups_flat_partition``), the inner
  AdamW state keyed by it; ``param._hp_mapping`` says which
  fragment of the parameter (``lp_fragment_address``) lives where in this rank's partition
  (``hp_fragment_address``), or is None when none of it does;
* ZeRO 3: one flat fp32 partition per sub-group (``fp32_partitioned_groups_flat``); ``grad_position`` gives
  the parameter's offset there, and the parameter's DP rank ``r`` holds elements ``r * partition_numel ...``
  of the flattened parameter (the last partition zero-padded).

Gathering: each fragment goes into a zero buffer of the parameter's size and the buffers are summed over the
DP group (ZeRO 1/2; ZeRO-3 all-gathers its equal partitions); TP slices are concatenated over the TP group
(``kiln.parallel.tensor_parallel.tp_split_dim``); pipeline stages exchange their dicts. Loading slices the full
tensors for the current layout: the TP slice (``tp_slice``), then this rank's DP fragment. So a state saved at
TP2 x PP2 loads at PP2 x DP2 with ZeRO 1, or at 1 rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kiln.parallel.pipeline import model_param_name
from kiln.parallel.tensor_parallel import tp_slice, tp_split_dim

if TYPE_CHECKING:
    from kiln.pretrain.engine.core import TrainEngine

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"  # the fp32 master weight, stored next to the Adam moments


def _kind(param: torch.nn.Parameter) -> str:
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "zero12"
    return "plain"


def _zero12_flats(opt) -> list[torch.Tensor] | None:
    """The flat fp32 partitions (one per parameter group) of ZeRO 1/2 or of DeepSpeed's bf16 optimizer (which
    ZeRO 1 becomes with bf16), or None."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            return getattr(opt, attr)
    return None


def _inner_optimizer(engine: TrainEngine) -> torch.optim.Optimizer:
    opt = engine.engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return opt
    if not (_zero12_flats(opt) is not None or hasattr(opt, "fp32_partitioned_groups_flat")):
        raise RuntimeError(
            f"checkpointing the optimizer state of DeepSpeed's {type(opt).__name__} is not supported (this "
            "layout/precision): use ZeRO stage 1, 2 or 3, or fp32 without ZeRO"
        )
    return opt.optimizer


def local_named_params(engine: TrainEngine) -> list[tuple[str, torch.nn.Parameter]]:
    """(KilnLlama name, parameter) of every parameter this rank holds, in module order (the same order on
    every rank of a DP / TP group, which the collectives below rely on)."""
    n_layers = engine.cfg.num_hidden_layers
    out = []
    for name, p in engine.module.named_parameters():
        out.append((model_param_name(name, n_layers) if engine.pipelined else name, p))
    return out


def optimizer_step(engine: TrainEngine) -> int:
    """AdamW's step count (0 before the first update), the same on every rank."""
    steps = [float(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s]
    local = torch.tensor([max(steps) if steps else 0.0], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        local = local.to(engine.ctx.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return int(local.item())


# ------------------------------------------------------------------------------------------------ read


def _local_value(engine: TrainEngine, p: torch.nn.Parameter, key: str | None) -> torch.Tensor | None:
    """This rank's TP slice of ``p``'s fp32 master (key None) or optimizer state ``key``, gathered over DP.
    Collective over the DP group for ZeRO parameters. None when the optimizer has no state yet."""
    opt = engine.engine.optimizer
    inner = _inner_optimizer(engine)
    kind = _kind(p)
    if kind == "plain":
        if key is None:
            return p.detach().float()
        state = inner.state.get(p, {})
        return state[key].detach().float() if key in state else None
    if kind == "zero3":
        if key is not None and not inner.state:
            return None
        return opt.get_full_hp_param(p, key).detach().float()
    # ZeRO 1/2
    if key is not None and not inner.state:
        return None
    buffer = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    mapping = p._hp_mapping
    if mapping is not None:
        flat = _zero12_flats(opt)[mapping.param_group_index]
        src = flat if key is None else inner.state[flat][key]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        buffer.narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
    dist.all_reduce(buffer, group=p._dp_group)
    return buffer.view_as(p)


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
            value = _local_value(engine, p, key)
            if value is None:  # before the first update: AdamW starts from zero moments
                value = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape, dtype=torch.float32)
            dim = tp_split_dim(name)
            if tp > 1 and dim is not None:
                value = value.to(engine.ctx.device).contiguous()
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


def _ensure_state(engine: TrainEngine, step: int) -> None:
    """Create AdamW's per-tensor state (zero moments) where it does not exist yet and set its step count."""
    inner = _inner_optimizer(engine)
    opt = engine.engine.optimizer
    # ZeRO 3 swaps each sub-group's flat partition into its (otherwise empty) param group only while stepping
    flats = _zero12_flats(opt) or getattr(opt, "fp32_partitioned_groups_flat", [])
    tensors = [t for group in inner.param_groups for t in group["params"]] + list(flats)
    for t in {id(t): t for t in tensors}.values():
        state = inner.state[t]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if torch.is_tensor(state["step"]):
            state["step"].fill_(float(step))
        else:
            state["step"] = float(step)


def _zero3_slice(engine: TrainEngine, p: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This DP rank's partition of the flattened ``value`` (zero-padded at the end like DeepSpeed's)."""
    opt = engine.engine.optimizer
    n = p.partition_numel()
    rank = opt._get_param_partition_rank(p)
    flat = value.flatten()
    padded = torch.zeros(n * opt._get_param_partition_world_size(p), dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    return padded.narrow(0, n * rank, n)


def _set_local(engine: TrainEngine, p: torch.nn.Parameter, key: str | None, value: torch.Tensor) -> None:
    """Write this rank's part of the TP-local ``value`` into the fp32 master (key None) or state ``key``."""
    opt = engine.engine.optimizer
    inner = _inner_optimizer(engine)
    kind = _kind(p)
    if kind == "plain":
        target = p.data if key is None else inner.state[p][key]
        target.copy_(value.view_as(target))
    elif kind == "zero3":
        group_idx, offset, numel = opt.grad_position[opt.get_param_id(p)]
        flat = opt.fp32_partitioned_groups_flat[group_idx]
        target = flat if key is None else inner.state[flat][key]
        target.narrow(0, offset, numel).copy_(_zero3_slice(engine, p, value))
    else:
        mapping = p._hp_mapping
        if mapping is None:
            return
        flat = _zero12_flats(opt)[mapping.param_group_index]
        target = flat if key is None else inner.state[flat][key]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        target.narrow(0, hp.start, hp.numel).copy_(value.flatten().narrow(0, lp.start, lp.numel))


@torch.no_grad()
def load_full_state(engine: TrainEngine, model_state: dict[str, torch.Tensor], optimizer_state: dict | None) -> None:
    """Load full-size weights (and, when given, the full optimizer state of `full_optimizer_state`) into this
    rank's slices. The weights the model computes with are set from ``model_state`` and the fp32 masters from
    the optimizer state's ``fp32`` entries (else from ``model_state``). Raises KeyError / ValueError naming the
    parameter when the checkpoint does not fit the model."""
    tp, tp_rank = engine.ctx.layout.tp, engine.ctx.tp_rank
    params = local_named_params(engine)
    entries = optimizer_state["params"] if optimizer_state is not None else {}
    for name, _ in params:
        if name not in model_state:
            raise KeyError(f"the checkpoint has no weight {name!r}")
        if optimizer_state is not None and name not in entries:
            raise KeyError(f"the checkpoint's optimizer state has no entry for {name!r}")
    if optimizer_state is not None:
        _ensure_state(engine, int(optimizer_state["step"]))
    opt = engine.engine.optimizer
    for name, p in params:
        full = model_state[name]
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        local = tp_slice(name, full, tp_rank, tp).to(device=p.device, dtype=torch.float32)
        if tuple(local.shape) != shape:
            raise ValueError(f"{name}: checkpoint slice has shape {tuple(local.shape)}, the model {shape}")
        # the weights the model computes with (bf16 or fp32)
        if _kind(p) == "zero3":
            p.ds_tensor.data.copy_(_zero3_slice(engine, p, local).to(p.ds_tensor.dtype))
        else:
            p.data.copy_(local.to(p.dtype))
        entry = entries.get(name)
        if _kind(p) != "plain":
            master = entry[MASTER] if entry is not None and MASTER in entry else full
            _set_local(engine, p, None, tp_slice(name, master, tp_rank, tp).to(p.device, torch.float32))
        if entry is not None:
            for key in ADAM_KEYS:
                _set_local(engine, p, key, tp_slice(name, entry[key], tp_rank, tp).to(p.device, torch.float32))
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False  # ZeRO 1/2 re-links its views of the state at the next step


__all__ = ["full_optimizer_state", "load_full_state", "local_named_params", "optimizer_step"]
