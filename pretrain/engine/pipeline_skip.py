"""Skip the optimizer update of a pipeline-parallel step whose loss is not finite (PP > 1, ZeRO 0/1).

Why here: DeepSpeed's ``PipelineEngine.train_batch`` runs forward, backward, the gradient all-reduces and the
optimizer step in one call, so the loss reaches kiln only after the update. The update is one instruction of
the pipeline schedule, ``OptimizerStep``, which every stage executes in the last slot of ``TrainSchedule``
(after ``ReduceTiedGrads`` and ``ReduceGrads``), through the class dict ``PipelineEngine._INSTRUCTION_MAP``
(``_exec_schedule`` looks it up on the instance). By then the last stage has run every micro-batch's forward and
holds their summed loss (``total_loss``). ``install_nonfinite_skip`` gives one engine instance its own copy of
that dict whose ``OptimizerStep`` first all-reduces a "non-finite loss" flag (MAX over the whole job: every
rank reaches ``OptimizerStep`` in the same schedule slot, and only last-stage ranks can raise it), then either
runs DeepSpeed's own ``_exec_optimizer_step`` or skips the update the way DeepSpeed skips an overflowed fp16
step (``DeepSpeedEngine._take_model_step`` with ``overflow`` set):

* the gradients are dropped where the optimizer keeps them: the module's ``.grad`` (ZeRO 0, fp32:
  ``torch.optim.AdamW``), the reduced flat partitions of ``DeepSpeedZeroOptimizer`` (ZeRO 1, the same clean-up
  as its own overflow branch in ``step``), or the fp32 gradient buffers of ``BF16_Optimizer`` (bf16);
* the weights, the fp32 masters and the AdamW state (moments, step count) are untouched;
* the engine's counters advance as for a skipped step (``skipped_steps``, ``global_steps``, ``global_samples``;
  ``_step_applied`` False), so batch accounting and the next step's accumulation boundary stay where DeepSpeed
  expects them.

Every DeepSpeed private attribute this needs is read in this module (pinned DeepSpeed 0.19; checked by the
PP NaN tests in tests/test_train_nan_eval.py): ``PipelineEngine._INSTRUCTION_MAP`` and ``total_loss``; the
engine counters ``_step_applied``, ``skipped_steps``, ``global_steps``, ``global_samples``, ``losses``; ZeRO 1's
``micro_step_id``, ``_release_preflattened_grad_buffers``, ``averaged_gradients``, ``all_grad_tensors``,
``cpu_offload`` / ``reset_cpu_buffers``. The cost is one 1-element all-reduce (and its host sync) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def skip_update(engine) -> None:
    """The end of a pipeline step without its optimizer update (see the module docstring)."""
    _drop_gradients(engine)
    _count_skipped(engine)


def install_nonfinite_skip(engine) -> SkipRecord:
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
            skip_update(self)
        else:
            original(self, lr_kwargs=lr_kwargs)

    # an instance attribute shadows the class's map for this engine only (_exec_schedule reads self._INSTRUCTION_MAP)
    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.OptimizerStep: optimizer_step_or_skip}
    return record


__all__ = ["SkipRecord", "install_nonfinite_skip", "skip_update"]
