"""DeepSpeed configuration for a recipe (here, beside the engine, because it reads the recipe, which
``kiln.parallel`` must not import): ZeRO stage, batch geometry, AdamW, clipping, precision.

ZeRO 1 (optimizer state sharded over DP) is the stage that composes with pipeline parallelism; 2 (also
gradients) and 3 (also parameters) only run without it (``TrainRecipe`` refuses the combination before any
group starts). The optimizer is DeepSpeed's ``torch_adam`` AdamW, i.e. ``torch.optim.AdamW`` wrapped by ZeRO,
so a 1-rank run and every layout run the same update rule. A single replica (DP = 1, PP = 1, fp32) runs
ZeRO 0 whatever stage the recipe asks for (``effective_zero_stage``): nothing to shard, and ZeRO 1 costs a
copy of every gradient into its flat partition per step.

Gradient clipping is global: DeepSpeed sums squared norms of TP-sharded parameters (those with the megatron
attribute ``tensor_model_parallel``, which ``kiln.parallel.tensor_parallel.mark_tensor_parallel_params`` sets
from the TP plan) on every TP rank and of replicated ones (norms, biases of row-parallel layers) on TP rank 0
only, then all-reduces over the DP group and the model-parallel (TP x PP) group; tied-embedding copies on the
last stage are marked ``ds_pipe_replicated`` and skipped.
"""

from __future__ import annotations

from typing import Any

from kiln.parallel.layout import Layout
from kiln.pretrain.recipe import TrainRecipe


def single_replica(recipe: TrainRecipe, layout: Layout) -> bool:
    """One data-parallel replica, no pipeline, fp32: ZeRO has nothing to shard (its stage only adds copies into
    flat partitions per step), and the engine clips the gradients itself (``TrainEngine``)."""
    return layout.dp == 1 and layout.pp == 1 and recipe.precision == "fp32"


def effective_zero_stage(recipe: TrainRecipe, layout: Layout) -> int:
    """The ZeRO stage DeepSpeed runs: 0 for a single replica (``single_replica``), else the recipe's. Checkpoints
    hold the full state under layout-independent names, so a ZeRO-0 one-rank run resumes at DP2 ZeRO 1 and
    back (``kiln.pretrain.engine.state``)."""
    return 0 if single_replica(recipe, layout) else recipe.parallel.zero_stage


def deepspeed_config(recipe: TrainRecipe, layout: Layout, global_batch: int | None = None) -> dict[str, Any]:
    p, opt = recipe.parallel, recipe.optimizer
    global_batch = global_batch or recipe.global_batch_at(0)
    gas = global_batch // (p.micro_batch * layout.dp)
    stage = effective_zero_stage(recipe, layout)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # keep every parameter partitioned (tiny ones too) so that stage 3 is exercised as configured
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": gas,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
                **adamw_implementation_kwargs(opt.implementation),
            },
        },
        # a single replica clips in TrainEngine (which also reports the norm); DeepSpeed elsewhere
        "gradient_clipping": 0.0 if single_replica(recipe, layout) else opt.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": recipe.precision == "bf16"},
        "fp16": {"enabled": False},
        # accumulate gradients over micro-batches in fp32 also with bf16 weights (as Megatron does)
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def adamw_implementation_kwargs(implementation: str) -> dict[str, bool]:
    """``torch.optim.AdamW``'s keyword for ``optimizer.implementation``. DeepSpeed's ``torch_adam`` path hands the
    remaining optimizer params to ``torch.optim.AdamW`` as they are (``fused``) and passes ``foreach`` itself."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]


def weight_decay_groups(named_params, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay matrices (projections, embeddings), not vectors (norms, biases)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


__all__ = [
    "adamw_implementation_kwargs",
    "deepspeed_config",
    "effective_zero_stage",
    "single_replica",
    "weight_decay_groups",
]
