"""Pretraining entry point.

    torchrun --nnodes N --nproc-per-node G -m pretrain.train recipes/pretrain/<recipe>.yaml [key=value ...]
    python -m pretrain.train recipes/pretrain/tiny.yaml            # one process, no torchrun
    python -m pretrain.train recipes/pretrain/llama_1b.yaml --dry-run parallel.tp=8 --world-size 64

The recipe is loaded and checked against the world size, and the data opened, before any process group
starts. The loop is short: features hang off callbacks (``pretrain.callbacks``: NaN guard, throughput/MFU,
console line, metrics file, W&B).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kiln.config import ConfigError
from pretrain.callbacks.base import Callback, CallbackList, TrainState
from pretrain.recipe import TrainRecipe, load_recipe


def build_dataset(recipe: TrainRecipe):
    """Global sample index -> sample: the indexed-dataset blend, or the synthetic source of tests/demos."""
    if recipe.synthetic_data is not None:
        from pretrain.engine.batches import SyntheticTokens

        s = recipe.synthetic_data
        return SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed, s.documents_per_sample)
    from pretrain.data import PretrainData

    return PretrainData(
        recipe.data,
        total_steps=recipe.train_steps,
        samples_at_step=recipe.samples_before_step,
        model_vocab_size=recipe.model.vocab_size,
    )


def default_callbacks(recipe: TrainRecipe, ctx, loggers: bool = True) -> list[Callback]:
    """NaN guard, throughput (tokens/s, TFLOP/s, MFU on GPU) and the console line; with ``loggers`` also the
    metrics file and W&B (offline unless the recipe says otherwise) under ``run_dir``."""
    from pretrain.callbacks import ConsoleLogger, MetricsFile, NanGuard, Throughput, WandbLogger
    from pretrain.callbacks.flops import flops_per_token, peak_flops_per_device

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
    from parallel.topology import init_parallel
    from pretrain.engine import TrainEngine, local_micro_batches
    from pretrain.schedule import LRSchedule

    dataset = dataset if dataset is not None else build_dataset(recipe)  # bad paths fail before any group
    if ctx is None:
        layout = recipe.layout(int(os.environ.get("WORLD_SIZE", "1")))
        ctx = init_parallel(layout, timeout_s=recipe.parallel.collective_timeout_s)
    layout, p = ctx.layout, recipe.parallel
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
    hooks = CallbackList([*default_callbacks(recipe, ctx, loggers), *callbacks])
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
    hooks.on_train_end(state)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipes/pretrain/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2 optimizer.lr=1e-3")
    parser.add_argument("--dry-run", action="store_true", help="check the layout, print memory and partition, exit")
    parser.add_argument("--world-size", type=int, default=None, help="world size for --dry-run (default: $WORLD_SIZE)")
    args = parser.parse_intermixed_args(argv)
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        layout = recipe.layout(world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from pretrain.engine.memory import dry_run_report

        if int(os.environ.get("RANK", "0")) == 0:
            print(dry_run_report(recipe, layout))
        return 0
    return train(recipe).exit_code


if __name__ == "__main__":
    sys.exit(main())
