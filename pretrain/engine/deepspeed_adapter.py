"""Every place kiln reads or writes DeepSpeed's private attributes and internal memory layout, in one module.

DeepSpeed has no public API for "where does this rank keep its part of parameter X's fp32 master and AdamW
moments" (what a sharded checkpoint needs), nor for "skip this update" (what the NaN guard needs), so kiln reads
its internals. They change between DeepSpeed releases without notice; keeping them here means one file to
re-check on an upgrade, and `check_deepspeed_version` refuses a version this file was not checked against
instead of failing later with an AttributeError deep in a save.

Where the optimizer state lives, per parameter (what `fragment` returns):

* no ZeRO (stage 0): the wrapped ``torch.optim.AdamW`` keyed by the parameter itself; the fp32 master is the
  weight;
* ZeRO 1/2 (and the ``BF16_Optimizer`` DeepSpeed uses for ZeRO 1 with bf16): one flat fp32 partition per
  parameter group and DP rank (``single_partition_of_fp32_groups`` / ``fp32_groups_flat_partition``), the inner
  AdamW state keyed by it; ``param._hp_mapping`` says which elements of the flattened parameter
  (``lp_fragment_address``) live where in this rank's partition (``hp_fragment_address``), or is None when none
  of it does;
* ZeRO 3: one flat fp32 partition per sub-group (``fp32_partitioned_groups_flat``); ``grad_position`` gives the
  parameter's offset there, and the parameter's partition rank ``r`` holds elements ``r * partition_numel ...``
  of the flattened parameter (the last partition zero-padded); the weights the model computes with are the
  same range of ``param.ds_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# The range of pyproject's train extra (``deepspeed>=0.19.8,<0.20``): the lower bound is the version CI installs
# (constraints.txt) and the tests exercise every function below against; the upper bound is the next minor
# release, since these are private attributes DeepSpeed may rename or reshape in any minor release (a patch
# release is the most we trust unseen). Raise it only after the checkpoint and NaN-skip tests pass on the new one.
SUPPORTED_MIN = (0, 19, 8)
SUPPORTED_BELOW = (0, 20, 0)
SUPPORTED_RANGE = ">=0.19.8,<0.20"

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_INITIAL_MICRO_STEP_ID = -1  # deepspeed.runtime.zero.stage_1_and_2.INITIAL_MICRO_STEP_ID


class UnsupportedDeepSpeedError(RuntimeError):
    """The installed DeepSpeed is outside the range whose internals this module was checked against."""


def _release(version: str) -> tuple[int, ...]:
    """ "0.19.8", "0.19.8+cu121", "0.20.0rc1" -> (0, 19, 8) / (0, 20, 0): the numeric release only."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check_deepspeed_version(version: str | None = None) -> str:
    """Raise `UnsupportedDeepSpeedError` unless ``version`` (default: the installed ``deepspeed.__version__``) is in
    `SUPPORTED_RANGE`; return the version. Called first thing by ``TrainEngine``."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if not SUPPORTED_MIN <= _release(version) < SUPPORTED_BELOW:
        raise UnsupportedDeepSpeedError(
            f"DeepSpeed {version} is installed, but kiln's trainer reads DeepSpeed internals checked only for "
            f"deepspeed{SUPPORTED_RANGE} (kiln/pretrain/engine/deepspeed_adapter.py); install a supported one: "
            f"pip install 'deepspeed{SUPPORTED_RANGE}'"
        )
    return version


# ------------------------------------------------------------------------------------------------ parameters


def param_kind(param: torch.nn.Parameter) -> str:
    """ "zero3" (partitioned by ZeRO 3), "zero12" (its optimizer state partitioned by ZeRO 1/2 or the bf16
    optimizer) or "plain" (ZeRO 0: a torch optimizer steps the parameter itself)."""
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "zero12"
    return "plain"


def local_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape on this TP rank (ZeRO 3 replaces ``param.data`` by an empty placeholder)."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def local_numel(param: torch.nn.Parameter) -> int:
    """Elements of the parameter on this TP rank, before ZeRO-3 partitioning."""
    return int(param.ds_numel) if hasattr(param, "ds_numel") else param.numel()


def is_pipeline_replica(param: torch.nn.Parameter) -> bool:
    """True for the last pipeline stage's copy of a tied weight (DeepSpeed's ``TiedLayerSpec``): the first stage
    holds the same values and writes them."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def _zero3_range(ds_optimizer, param: torch.nn.Parameter) -> tuple[int, int, int]:
    """(start, valid elements, partition size) of this rank's ZeRO-3 partition of the flattened parameter."""
    n = int(param.partition_numel())
    rank = ds_optimizer._get_param_partition_rank(param)
    start = rank * n
    return start, max(0, min(n, local_numel(param) - start)), n


def weight_fragment(ds_optimizer, param: torch.nn.Parameter) -> tuple[int, torch.Tensor] | None:
    """(start, flat view) of the weights the model computes with that this rank holds: elements
    ``start ... start + len(view)`` of the flattened TP-local parameter (all of it but at ZeRO 3; None when a
    ZeRO-3 rank holds only padding of it). The view aliases the live weights: writing it loads them."""
    if param_kind(param) != "zero3":
        return 0, param.data.view(-1)
    start, valid, _ = _zero3_range(ds_optimizer, param)
    if valid == 0:
        return None
    return start, param.ds_tensor.data.view(-1).narrow(0, 0, valid)


@dataclass(frozen=True)
class Fragment:
    """This rank's part of one parameter's optimizer state: elements ``start ... start + numel`` of the flattened
    (TP-local) parameter are elements ``offset ... offset + numel`` of ``owner`` (the tensor the inner AdamW steps
    and keys its state by: a flat fp32 partition, or the parameter itself without ZeRO)."""

    owner: torch.Tensor
    offset: int
    start: int
    numel: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The fragment's flat view into ``tensor`` (``owner`` or a state tensor shaped like it)."""
        return tensor.view(-1).narrow(0, self.offset, self.numel)


def _zero12_flats(ds_optimizer) -> list[torch.Tensor] | None:
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(ds_optimizer, attr):
            return getattr(ds_optimizer, attr)
    return None


def inner_optimizer(ds_optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer holding the AdamW state (DeepSpeed's ZeRO / bf16 wrappers keep it inside)."""
    if isinstance(ds_optimizer, torch.optim.Optimizer):
        return ds_optimizer
    if _zero12_flats(ds_optimizer) is None and not hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):
        raise RuntimeError(
            f"checkpointing the optimizer state of DeepSpeed's {type(ds_optimizer).__name__} is not supported (this "
            "layout/precision): use ZeRO stage 1, 2 or 3, or fp32 without ZeRO"
        )
    return ds_optimizer.optimizer


def fragment(ds_optimizer, param: torch.nn.Parameter) -> Fragment | None:
    """Where this rank keeps its part of ``param``'s fp32 master and AdamW moments (None: no part of it here)."""
    kind = param_kind(param)
    if kind == "plain":
        return Fragment(param, 0, 0, param.numel())
    if kind == "zero12":
        mapping = param._hp_mapping
        if mapping is None:
            return None
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        flat = _zero12_flats(ds_optimizer)[mapping.param_group_index]
        return Fragment(flat, int(hp.start), int(lp.start), int(lp.numel))
    start, valid, _ = _zero3_range(ds_optimizer, param)
    if valid == 0:
        return None
    group_idx, offset, _ = ds_optimizer.grad_position[ds_optimizer.get_param_id(param)]
    return Fragment(ds_optimizer.fp32_partitioned_groups_flat[group_idx], int(offset), start, valid)


def fragment_group(ds_optimizer, param: torch.nn.Parameter):
    """The process group over which ``param``'s fragments are spread (None: all of it is on this rank)."""
    kind = param_kind(param)
    if kind == "zero12":
        return param._dp_group
    if kind == "zero3":
        return ds_optimizer._get_param_partition_group(param)
    return None


def optimizer_state_tensors(ds_optimizer) -> list[torch.Tensor]:
    """Every tensor the inner AdamW keeps state for (ZeRO 3 swaps each sub-group's flat partition into its
    otherwise empty param group only while stepping, so those are listed from the partition list)."""
    inner = inner_optimizer(ds_optimizer)
    flats = _zero12_flats(ds_optimizer) or getattr(ds_optimizer, "fp32_partitioned_groups_flat", [])
    tensors = [t for group in inner.param_groups for t in group["params"]] + list(flats)
    return list({id(t): t for t in tensors}.values())


def unlink_optimizer_views(ds_optimizer) -> None:
    """After writing the AdamW state from outside: ZeRO 1/2 and the bf16 optimizer keep per-parameter views of
    it (for their own checkpoint API) and must re-link them at the next step."""
    if hasattr(ds_optimizer, "_hp_optimizer_states_linked"):
        ds_optimizer._hp_optimizer_states_linked = False


# ------------------------------------------------------------------------------------------------ skipping a step


def skip_update(ds_engine, module: torch.nn.Module) -> None:
    """The accumulation boundary without the optimizer update (PP = 1): drop this step's gradients where DeepSpeed
    keeps them (the module's ``.grad`` at ZeRO 0; also the reduced partitions at ZeRO 1/2/3, as DeepSpeed's own
    overflow skip does) and advance the engine's counters as a skipped step, so that the next step starts from
    clean gradients and the accumulation boundary stays where DeepSpeed expects it. The AdamW state (moments,
    step count) and the weights are untouched."""
    if not ds_engine.is_gradient_accumulation_boundary():
        raise RuntimeError("internal: skip_update outside the gradient-accumulation boundary")
    stage = ds_engine.zero_optimization_stage()
    if stage == 0:
        ds_engine.zero_grad()
        module.zero_grad(set_to_none=True)
    else:
        opt = ds_engine.optimizer
        opt.zero_grad(set_to_none=True)
        if stage in (1, 2):
            release = getattr(opt, "_release_preflattened_grad_buffers", None)
            if release is not None:
                release()
            if getattr(opt, "cpu_offload", False):
                opt.reset_cpu_buffers()
            else:
                for k in list(opt.averaged_gradients.keys()):
                    opt.averaged_gradients[k] = None
            opt.micro_step_id = _INITIAL_MICRO_STEP_ID
        else:
            opt.averaged_gradients = {}
    ds_engine._step_applied = False
    ds_engine.skipped_steps += 1
    ds_engine.global_steps += 1
    ds_engine.global_samples += ds_engine.train_batch_size()
    ds_engine.micro_steps += 1


# ------------------------------------------------------------------------------------------------ skipping a pipeline step
#
# Skip the optimizer update of a pipeline-parallel step whose loss is not finite (PP > 1, ZeRO 0/1).
#
# Why here: DeepSpeed's ``PipelineEngine.train_batch`` runs forward, backward, the gradient all-reduces and the
# optimizer step in one call, so the loss reaches kiln only after the update. The update is one instruction of
# the pipeline schedule, ``OptimizerStep``, which every stage executes in the last slot of ``TrainSchedule``
# (after ``ReduceTiedGrads`` and ``ReduceGrads``), through the class dict ``PipelineEngine._INSTRUCTION_MAP``
# (``_exec_schedule`` looks it up on the instance). By then the last stage has run every micro-batch's forward and
# holds their summed loss (``total_loss``). ``install_nonfinite_skip`` gives one engine instance its own copy of
# that dict whose ``OptimizerStep`` first all-reduces a "non-finite loss" flag (MAX over the whole job: every
# rank reaches ``OptimizerStep`` in the same schedule slot, and only last-stage ranks can raise it), then either
# runs DeepSpeed's own ``_exec_optimizer_step`` or skips the update the way DeepSpeed skips an overflowed fp16
# step (``DeepSpeedEngine._take_model_step`` with ``overflow`` set):
#
# * the gradients are dropped where the optimizer keeps them: the module's ``.grad`` (ZeRO 0, fp32:
#   ``torch.optim.AdamW``), the reduced flat partitions of ``DeepSpeedZeroOptimizer`` (ZeRO 1, the same clean-up
#   as its own overflow branch in ``step``), or the fp32 gradient buffers of ``BF16_Optimizer`` (bf16);
# * the weights, the fp32 masters and the AdamW state (moments, step count) are untouched;
# * the engine's counters advance as for a skipped step (``skipped_steps``, ``global_steps``, ``global_samples``;
#   ``_step_applied`` False), so batch accounting and the next step's accumulation boundary stay where DeepSpeed
#   expects them.
#
# Every DeepSpeed private attribute this needs is read in this module (pinned DeepSpeed 0.19; checked by the
# PP NaN tests in tests/test_train_nan_eval.py): ``PipelineEngine._INSTRUCTION_MAP`` and ``total_loss``; the
# engine counters ``_step_applied``, ``skipped_steps``, ``global_steps``, ``global_samples``, ``losses``; ZeRO 1's
# ``micro_step_id``, ``_release_preflattened_grad_buffers``, ``averaged_gradients``, ``all_grad_tensors``,
# ``cpu_offload`` / ``reset_cpu_buffers``. The cost is one 1-element all-reduce (and its host sync) per step.


@dataclass
class SkipRecord:
    """What the last ``OptimizerStep`` did on this rank: ``skipped`` is True when the update was suppressed."""

    skipped: bool = False


def _local_nonfinite(engine) -> float:
    """1.0 when this rank is a last-stage rank whose summed micro-batch loss is not finite, else 0.0."""
    if not engine.is_last_stage():
        return 0.0
    total = engine.total_loss  # sum of this replica's micro-batch losses, accumulated by _exec_forward_pass
    if total is None:
        raise RuntimeError("internal: OptimizerStep on the last pipeline stage before any forward pass")
    losses = total if isinstance(total, list | tuple) else [total]
    return 0.0 if all(bool(torch.isfinite(t).all()) for t in losses) else 1.0


def _drop_gradients(engine) -> None:
    """This step's gradients, discarded where the engine's optimizer keeps them (DeepSpeed's overflow clean-up)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):  # ZeRO 1 (and 2): mirrors the overflow branch of its step()
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
        else:
            for k in list(opt.averaged_gradients.keys()):
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None
    elif isinstance(opt, BF16_Optimizer):  # bf16 weights with fp32 gradient accumulators and masters
        opt.zero_grad(set_to_none=True)
    elif isinstance(opt, torch.optim.Optimizer):  # ZeRO 0, fp32: the wrapped AdamW reads the module's .grad
        engine.zero_grad()
    else:
        raise RuntimeError(
            f"skipping a non-finite pipeline step is not supported with DeepSpeed's {type(opt).__name__}; "
            "use ZeRO 0 or 1 with fp32 or bf16"
        )


def _count_skipped(engine) -> None:
    """Advance the engine as ``_take_model_step`` does for an overflowed step (no LR-scheduler step)."""
    engine._step_applied = False
    engine.skipped_steps += 1
    engine.losses = None
    engine.global_steps += 1
    if not engine.managed_gradient_accumulation():
        raise RuntimeError("internal: the pipeline engine runs DeepSpeed's managed gradient accumulation")
    engine.global_samples += engine.train_batch_size()


def skip_pipeline_update(engine) -> None:
    """The end of a pipeline step without its optimizer update (see this section's comment)."""
    _drop_gradients(engine)
    _count_skipped(engine)


def install_pipeline_nonfinite_skip(engine) -> SkipRecord:
    """Make ``engine`` (a DeepSpeed ``PipelineEngine``) skip the update of every step whose loss is not finite
    on any last-stage rank, on every rank alike. Returns the record its ``OptimizerStep`` writes each step."""
    from deepspeed.runtime.pipe import schedule

    record = SkipRecord()
    original = type(engine)._INSTRUCTION_MAP[schedule.OptimizerStep]
    group_device = engine.device

    def optimizer_step_or_skip(self, lr_kwargs=None):
        flag = torch.tensor([_local_nonfinite(self)], dtype=torch.float32, device=group_device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        record.skipped = bool(flag.item() > 0)  # the one host sync: the branch needs the job-wide answer
        if record.skipped:
            skip_pipeline_update(self)
        else:
            original(self, lr_kwargs=lr_kwargs)

    # an instance attribute shadows the class's map for this engine only (_exec_schedule reads self._INSTRUCTION_MAP)
    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.OptimizerStep: optimizer_step_or_skip}
    return record


__all__ = [
    "ADAM_KEYS",
    "SkipRecord",
    "install_pipeline_nonfinite_skip",
    "skip_pipeline_update",
    "SUPPORTED_RANGE",
    "Fragment",
    "UnsupportedDeepSpeedError",
    "check_deepspeed_version",
    "fragment",
    "fragment_group",
    "inner_optimizer",
    "is_pipeline_replica",
    "local_numel",
    "local_shape",
    "optimizer_state_tensors",
    "param_kind",
    "skip_update",
    "unlink_optimizer_views",
    "weight_fragment",
]
