"""Training entry point (pretraining and SFT).

    torchrun --nnodes N --nproc-per-node G -m kiln train recipes/pretrain/<recipe>.yaml [key=value ...]
    kiln train recipes/pretrain/tiny.yaml            # one process, no torchrun
    kiln train recipes/pretrain/llama_1b.yaml --dry-run parallel.tp=8 --world-size 64

The recipe is loaded and checked against the world size, and the data opened, before any process group
starts. This module builds the pieces from the recipe (data, train module, callbacks) and hands them to the
``Trainer`` (``kiln.pretrain.trainer``), whose loop is short: features hang off callbacks
(``kiln.pretrain.callbacks``: NaN guard, checkpointer, evaluator, throughput/MFU, console line, metrics file,
W&B).

Checkpoints (``kiln.pretrain.checkpoint``): every ``checkpoint.interval`` steps, at the end, and when SIGTERM /
SIGUSR1 arrives (at the next flag poll, every ``flag_poll_interval`` steps, every rank saves and the job exits
0). A checkpoint is sharded (``torch.distributed.checkpoint``: each rank writes the TP slices and ZeRO fragments
it holds, under layout-independent names), with the train state (step, consumed samples = the data position,
since sample ``i`` is a pure function of ``i``) and every rank's RNG state; the LR is a function of the step.
``resume=true`` continues from the newest complete checkpoint under ``checkpoint.dir`` (a half-written one is
skipped with a warning), ``resume=<path>`` from that checkpoint or root, at any TP/PP/DP/ZeRO layout; the older
full format still loads.

SFT recipes (``recipes/sft/*.yaml``) train the same way: the data section is built first when its folder is
missing (``kiln data sft``), ``init_from`` gives the starting weights, the loss is normalised over the step's
trainable tokens and the held-out agent / general losses are evaluated (``kiln.pretrain.sft_data``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from kiln.config import ConfigError
from kiln.pretrain.callbacks.base import Callback, TrainState
from kiln.pretrain.checkpointing import resolve_resume
from kiln.pretrain.recipe import TrainRecipe, load_recipe

log = logging.getLogger(__name__)


def build_dataset(recipe: TrainRecipe):
    """Global sample index -> sample: the indexed-dataset blend, packed SFT conversations (built first when
    the folder is missing), or the synthetic source of tests/demos."""
    if recipe.sft is not None:
        from kiln.pretrain.sft_data import SFTTrainData, ensure_sft_data

        ensure_sft_data(recipe.sft, name=recipe.name)
        return SFTTrainData(
            recipe.sft.output_dir,
            seed=recipe.sft.seed,
            seq_length=recipe.seq_length,
            model_vocab_size=recipe.model.vocab_size,
        )
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


def build_validation(recipe: TrainRecipe, dataset) -> dict[str, object]:
    """The held-out splits the evaluation reads, by name (each with ``batches(batch_size, max_batches, dp_rank,
        dp_size)``): ``{"": split}`` for the data's validation split, or for synthetic data the same generator under
        ``synthetic_data.seed + 1``; for SFT data one per role (``val_agent_loss``, ``val_general_loss``) and with ``eval.per_source`` one per
    source too (``val_source_<name>_loss``)."""
    if recipe.sft is not None:
        if not dataset.heldout:
            raise ConfigError(
                f"eval.interval={recipe.eval.interval} needs held-out data: set data.heldout_fraction > 0 in the "
                "SFT recipe (or eval.interval=0)"
            )
        per_source = {f"source_{name}": split for name, split in dataset.heldout.items()}
        return {**dataset.heldout_by_role, **(per_source if recipe.eval.per_source else {})}
    if recipe.synthetic_data is not None and getattr(dataset, "validation", None) is None:
        from kiln.pretrain.engine.batches import SyntheticTokens, SyntheticValidation

        s = recipe.synthetic_data
        return {
            "": SyntheticValidation(
                SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed + 1, s.documents_per_sample)
            )
        }
    validation = getattr(dataset, "validation", None)
    if validation is None:
        raise ConfigError(
            f"eval.interval={recipe.eval.interval} needs a validation split: set data.validation_fraction or "
            "data.validation in the recipe (or eval.interval=0)"
        )
    return {"": validation}


def load_initial_weights(recipe: TrainRecipe, engine) -> None:
    """``init_from``'s weights into the engine (the fp32 masters too; AdamW starts from zero moments), after
    checking that they are the architecture the ``model`` section describes."""
    from kiln.pretrain.hf_io import load_model

    model, cfg = load_model(recipe.init_from)
    check_same_architecture(recipe.model, cfg, source=recipe.init_from)
    # the parameters themselves, not full_state_dict()'s copies: the engine copies them into its own buffers
    engine.load_full_state({name: p.detach() for name, p in model.named_parameters()}, None)
    if engine.ctx.rank == 0:
        print(f"initial weights from {recipe.init_from}", flush=True)


# The ModelConfig fields that decide the weights and the function they compute; the others (attention
# backend, fused kernels, document masking, sequence parallelism) are how this run computes it.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "attention_bias", "mlp_bias",
)  # fmt: skip


def check_same_architecture(ours, theirs, source: str) -> None:
    """ConfigError naming every architecture field where the recipe's ``model`` differs from ``source``'s."""
    diffs = []
    for name in ARCHITECTURE_FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            diffs.append(f"model.{name}: recipe {a!r}, {source} {b!r}")
    if diffs:
        raise ConfigError(
            f"init_from={source} is another architecture than the recipe's model section: " + "; ".join(diffs)
        )


def default_callbacks(
    recipe: TrainRecipe, engine, validation: dict | None = None, loggers: bool = True
) -> list[Callback]:
    """NaN guard, checkpointer, evaluator (when ``validation`` is given), throughput (tokens/s, TFLOP/s, MFU on
    GPU) and the console line; with ``loggers`` also the metrics file and W&B (offline unless the recipe says
    otherwise) under ``run_dir``. Their priorities order them, not this list."""
    from kiln.pretrain.callbacks import Checkpointer, ConsoleLogger, MetricsFile, NanGuard, Throughput, WandbLogger
    from kiln.pretrain.callbacks.flops import flops_per_token, peak_flops_per_device
    from kiln.pretrain.checkpoint import CheckpointManager

    peak = None
    if engine.ctx.device.type == "cuda":
        peak = peak_flops_per_device("bfloat16" if recipe.precision == "bf16" else "float32")
    ck = recipe.checkpoint
    callbacks: list[Callback] = [
        NanGuard(recipe.max_nan_steps),
        Checkpointer(CheckpointManager(recipe.checkpoint_dir, keep_last=ck.keep_last), ck.interval, ck.save_final),
        Throughput(flops_per_token(recipe.model, recipe.seq_length, causal=True), peak),
        ConsoleLogger(),
    ]
    if validation is not None:
        from kiln.pretrain.callbacks.evaluation import EngineEvaluator, validation_batches

        ev = recipe.eval
        for name, split in validation.items():
            batches = validation_batches(split, ev.batch_size or recipe.parallel.micro_batch, engine.ctx, ev.batches)
            prefix = f"val_{name}" if name else "val"
            callbacks.append(
                EngineEvaluator(engine, batches, interval=ev.interval, prefix=prefix, at_start=ev.at_start)
            )
    if loggers:
        callbacks.append(MetricsFile(recipe.run_dir))
        if recipe.wandb_mode != "disabled":
            callbacks.append(WandbLogger(recipe.run_dir, mode=recipe.wandb_mode, config=recipe.to_dict()))
    return callbacks


def train(
    recipe: TrainRecipe,
    callbacks: Sequence[Callback] = (),
    *,
    dataset=None,
    ctx=None,
    loggers: bool = True,
    engine=None,
) -> TrainState:
    """Train ``recipe`` on this job's processes (or on ``ctx``'s groups when given) and return the final state.
    ``callbacks`` join the default ones (``default_callbacks``); ``engine``: a ``TrainEngine`` built by the
    caller on ``ctx`` (to read its weights afterwards), else one is built here. Everything that can be wrong
    with the recipe, the data or the resume path fails before any process group starts."""
    from kiln.parallel.topology import init_parallel
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.trainer import Trainer, new_state

    dataset = dataset if dataset is not None else build_dataset(recipe)
    validation = build_validation(recipe, dataset) if recipe.eval.interval > 0 else None
    resume_from = resolve_resume(recipe)
    if ctx is None:
        ctx = init_parallel(
            recipe.layout(int(os.environ.get("WORLD_SIZE", "1"))), timeout_s=recipe.parallel.collective_timeout_s
        )
    engine = engine if engine is not None else TrainEngine(recipe, ctx)
    state = new_state(recipe, ctx)
    if resume_from is not None:
        engine.load_checkpoint(resume_from, state)
    elif recipe.init_from is not None:
        load_initial_weights(recipe, engine)
    hooks = [*default_callbacks(recipe, engine, validation, loggers), *callbacks]
    return Trainer(recipe, engine, dataset, ctx, state=state, callbacks=hooks).fit()


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
