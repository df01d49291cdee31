"""Pretraining entry point.

    torchrun --nnodes N --nproc-per-node G -m kiln train recipes/pretrain/<recipe>.yaml [key=value ...]
    kiln train recipes/pretrain/tiny.yaml            # one process, no torchrun
    kiln train recipes/pretrain/llama_1b.yaml --dry-run parallel.tp=8 --world-size 64

The recipe is loaded and checked against the world size, and the data opened, before any process group
starts. The loop is short: features hang off callbacks (``kiln.pretrain.callbacks``: NaN guard, throughput/MFU,
console line, metrics file, W&B).

Checkpoints (``kiln.pretrain.checkpoint``): every ``checkpoint.interval`` steps, at the end, and when SIGTERM /
SIGUSR1 arrives (the loop finishes the current step, saves, and exits 0). A checkpoint holds the full model and
optimizer state under layout-independent names, the train state (step, consumed samples = the data position,
since sample ``i`` is a pure function of ``i``) and every rank's RNG state; the LR is a function of the step.
``resume=true`` continues from the newest complete checkpoint under ``checkpoint.dir`` (a half-written one is
skipped with a warning), ``resume=<path>`` from that checkpoint or root, at any TP/PP/DP layout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kiln.config import ConfigError
from kiln.pretrain.callbacks.base import Callback, CallbackList, TrainState
from kiln.pretrain.checkpointing import resolve_resume, restore_checkpoint, save_train_checkpoint
from kiln.pretrain.recipe import TrainRecipe, load_recipe

log = logging.getLogger(__name__)


def build_dataset(recipe: TrainRecipe):
    """Global sample index -> sample: the indexed-dataset blend, or the synthetic source of tests/demos."""
    if recipe.synthetic_data is not None:
        from kiln.pretrain.engine.batches import SyntheticTokens

        s = recipe.synthetic_data
        return SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed, s.documents_per_sample)
    from kiln.pretrain.data import PretrainData

    return PretrainData(
        recipe.data,
        total_steps=recipe.train_steps,
        samples_at_step=recipe.samples_before_step,
        model_vocab_size=recipe.model.vocab_size,
    )


def build_validation(recipe: TrainRecipe, dataset):
    """The held-out split the evaluation reads (``batches(batch_size, max_batches, dp_rank, dp_size)``): the
    data's validation split, or for synthetic data the same generator under ``synthetic_data.seed + 1``."""
    if recipe.synthetic_data is not None and getattr(dataset, "validation", None) is None:
        from kiln.pretrain.engine.batches import SyntheticTokens, SyntheticValidation

        s = recipe.synthetic_data
        return SyntheticValidation(
            SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed + 1, s.documents_per_sample)
        )
    validation = getattr(dataset, "validation", None)
    if validation is None:
        raise ConfigError(
            f"eval.interval={recipe.eval.interval} needs a validation split: set data.validation_fraction or "
            "data.validation in the recipe (or eval.interval=0)"
        )
    return validation


def default_callbacks(recipe: TrainRecipe, ctx, loggers: bool = True) -> list[Callback]:
    """NaN guard, throughput (tokens/s, TFLOP/s, MFU on GPU) and the console line; with ``loggers`` also the
    metrics file and W&B (offline unless the recipe says otherwise) under ``run_dir``."""
    from kiln.pretrain.callbacks import ConsoleLogger, MetricsFile, NanGuard, Throughput, WandbLogger
    from kiln.pretrain.callbacks.flops import flops_per_token, peak_flops_per_device

    peak = None
    if ctx.device.type == "cuda":
        peak = peak_flops_per_device("bfloat16" if recipe.precision == "bf16" else "float32")
    callbacks: list[Callback] = [
        NanGuard(recipe.max_nan_steps),
        Throughput(flops_per_token(recipe.model, recipe.seq_length, causal=True), peak),
        ConsoleLogger(recipe.log_interval),
    ]
    if loggers:
        callbacks.append(MetricsFile(recipe.run_dir, recipe.log_interval))
        if recipe.wandb_mode != "disabled":
            callbacks.append(WandbLogger(recipe.run_dir, mode=recipe.wandb_mode, config=recipe.to_dict()))
    return callbacks


def _agree_on_flags(state: TrainState, ctx) -> None:
    """A signal may reach only some ranks: every rank saves and stops if any rank was asked to."""
    import torch
    import torch.distributed as dist

    if ctx.world_size == 1:
        return
    flags = torch.tensor([int(state.should_save), int(state.should_stop)], device=ctx.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    should_save, should_stop = bool(flags[0]), bool(flags[1])
    if should_stop and not state.should_stop:
        state.stop_reason = state.stop_reason or "stop requested on another rank"
    state.should_save, state.should_stop = should_save, should_stop


def train(
    recipe: TrainRecipe,
    callbacks: Sequence[Callback] = (),
    dataset=None,
    ctx=None,
    loggers: bool = True,
    engine=None,
) -> TrainState:
    """Train ``recipe`` on this job's processes (or on ``ctx``'s groups when given) and return the final state.
    ``callbacks`` run after the default ones (``default_callbacks``); ``engine``: a ``TrainEngine`` built by the
    caller on ``ctx`` (to read its weights afterwards), else one is built here."""
    from kiln.parallel.topology import init_parallel
    from kiln.pretrain.checkpoint import CheckpointManager, install_preemption_handler
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.schedule import LRSchedule

    dataset = dataset if dataset is not None else build_dataset(recipe)  # bad paths fail before any group
    validation = build_validation(recipe, dataset) if recipe.eval.interval > 0 else None
    resume_from = resolve_resume(recipe)  # a bad resume path fails before any group too
    if ctx is None:
        layout = recipe.layout(int(os.environ.get("WORLD_SIZE", "1")))
        ctx = init_parallel(layout, timeout_s=recipe.parallel.collective_timeout_s)
    layout = ctx.layout
    engine = engine if engine is not None else TrainEngine(recipe, ctx)
    schedule = LRSchedule(recipe.schedule, recipe.optimizer.lr, recipe.train_steps)
    state = TrainState(
        total_steps=recipe.train_steps,
        run_dir=Path(recipe.run_dir),
        rank=ctx.rank,
        world_size=ctx.world_size,
        dp_size=layout.dp,
        tp_size=layout.tp,
        pp_size=layout.pp,
    )
    if resume_from is not None:
        restore_checkpoint(resume_from, engine, state, ctx)
    ck = recipe.checkpoint
    manager = CheckpointManager(recipe.checkpoint_dir, keep_last=ck.keep_last)
    hooks = CallbackList([*default_callbacks(recipe, ctx, loggers), *callbacks])
    evaluator = None
    if validation is not None:
        from kiln.pretrain.callbacks.evaluation import EngineEvaluator, validation_batches

        ev = recipe.eval
        batches = validation_batches(validation, ev.batch_size or recipe.parallel.micro_batch, ctx, ev.batches)
        # last, so that its on_eval reaches every callback (console, metrics file, W&B) after the step's metrics;
        # the evaluation at the end runs in the loop before the callbacks' on_train_end (which close the loggers)
        evaluator = EngineEvaluator(engine, batches, interval=ev.interval, sink=hooks, at_end=False)
        hooks.append(evaluator)
    handler = install_preemption_handler(state) if threading.current_thread() is threading.main_thread() else None
    try:
        _loop(
            recipe,
            hooks,
            dataset,
            ctx,
            engine,
            schedule,
            state,
            manager,
            evaluator,
        )
    finally:
        if handler is not None:
            handler.uninstall()
    return state


def _loop(
    recipe: TrainRecipe, hooks: CallbackList, dataset, ctx, engine, schedule, state, manager, evaluator=None
) -> None:
    from kiln.pretrain.engine import local_micro_batches

    layout, p, ck = ctx.layout, recipe.parallel, recipe.checkpoint
    last_saved = state.step if state.step > 0 else -1  # a resumed run starts at a saved step
    hooks.on_train_start(state)
    while state.step < recipe.train_steps and not state.should_stop:
        start = time.perf_counter()
        global_batch = recipe.global_batch_at(state.consumed_samples)
        batches = local_micro_batches(
            dataset, state.consumed_samples, global_batch, p.micro_batch, ctx.dp_rank, layout.dp
        )
        metrics = engine.train_step(batches, global_batch, schedule(state.step))
        state.step += 1
        state.consumed_samples += global_batch
        tokens = global_batch * recipe.seq_length
        state.tokens += tokens
        metrics.update(global_batch=global_batch, tokens=tokens, step_time_s=time.perf_counter() - start)
        hooks.on_step_end(state, metrics)
        _agree_on_flags(state, ctx)
        periodic = ck.interval > 0 and state.step % ck.interval == 0
        final = ck.save_final and ck.interval > 0 and state.step == recipe.train_steps
        # a run stopped by NanGuard (exit code 1) keeps the checkpoints from before its bad steps
        if state.exit_code == 0 and (state.should_save or periodic or final):
            save_train_checkpoint(manager, recipe, engine, state, ctx)
            state.should_save = False
            last_saved = state.step
    _agree_on_flags(state, ctx)
    if (
        state.exit_code == 0 and state.should_save and last_saved != state.step
    ):  # e.g. a signal that arrived during the last step
        save_train_checkpoint(manager, recipe, engine, state, ctx)
        state.should_save = False
    if evaluator is not None and state.step > 0 and state.exit_code == 0:
        if not evaluator.history or evaluator.history[-1][0] != state.step:
            evaluator.run(state)  # the final held-out loss, unless the last step was just evaluated
    hooks.on_train_end(state)


def run_command(recipe_arg: str, overrides: Sequence[str], dry_run: bool = False, world_size: int | None = None) -> int:
    """`kiln train RECIPE [key=value ...] [--dry-run]`, in this process or in each rank of a torchrun job. The
    recipe (a file, or a shipped recipe's name) is loaded and checked against the world size before any process
    group starts; a ConfigError propagates to the CLI, which prints it in the one `kiln: error:` format."""
    from kiln.catalog import resolve_recipe_path
    from kiln.logs import log_to_file

    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    recipe = load_recipe(str(resolve_recipe_path(recipe_arg)), overrides)
    layout = recipe.layout(world_size)
    if dry_run:
        from kiln.pretrain.engine.memory import dry_run_report

        if int(os.environ.get("RANK", "0")) == 0:
            print(dry_run_report(recipe, layout))
        return 0
    log_to_file(Path(recipe.run_dir) / "logs" / f"train_rank{int(os.environ.get('RANK', '0'))}.log")
    return train(recipe).exit_code
