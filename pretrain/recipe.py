"""The training recipe: typed dataclasses loaded from ``recipes/pretrain/*.yaml`` or ``recipes/sft/*.yaml`` plus
``key=value`` overrides.

An SFT recipe is one file for both stages: its ``data`` section is the SFT builder's (``kiln data sft`` reads it:
sources, template, mix, packing) and lands in ``TrainRecipe.sft`` here; the other sections are the trainer's,
with ``init_from`` naming the weights to start from. Its loss is normalised over the trainable tokens of the
whole step (``loss_normalization: global_tokens``).

Everything a run needs is here and is checked twice before any process group starts:

* the ``validate()`` hooks (run once each by the loader, ``kiln.config.validate_tree``): values that make sense on
  their own (positive sizes, a known schedule, a batch ramp that reaches the global batch in whole increments);
  each raises ``ValueError`` about its own fields and the loader names the file and key;
* ``TrainRecipe.layout(world_size)``: the parallel layout against the number of processes (world size ==
  TP x PP x DP, heads / KV heads / vocabulary divisible by TP, at least one layer per pipeline stage, the
  global batch (and every ramp-up value) divisible by micro batch x DP, ZeRO 2/3 only without PP).

Both end in a ``ConfigError`` whose message names the key, so a 64-node job fails in a second on rank 0's
console instead of after minutes of process-group setup. Nothing here imports torch: ``load_recipe`` is what the
CLI, ``--dry-run`` and every rank run first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.config import ConfigError, apply_overrides, build_dataclass, read_yaml, to_dict
from kiln.data_pipeline.sft.config import SFTDataConfig
from kiln.parallel.layout import Layout, ParallelConfig

# DataConfig from kiln.pretrain.config, not kiln.pretrain.data: the latter imports torch.
from kiln.pretrain.config import DataConfig, ModelConfig


@dataclass
class OptimizerConfig:
    """AdamW. Weight decay applies to matrices (projections, embeddings), not to norms and biases."""

    lr: float = 3e-4  # peak learning rate (the schedule scales it)
    # AdamW (beta1, beta2); beta2 0.95 as MT-NLG and Llama use against loss spikes
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay of the matrices (norms and biases get none)
    clip_grad: float = 1.0  # global gradient-norm clip over all TP/PP/DP shards; 0 disables
    # How torch.optim.AdamW runs the update, the same rule each way up to float rounding: ``fused`` (one kernel
    # over all of a group's tensors, on CPU and CUDA; torchtitan's default), ``foreach`` (multi-tensor ops) or
    # ``for-loop`` (one tensor at a time, what ``torch.optim.AdamW(params)`` does on CPU). Fused is the default
    # because it is the fastest: with it the 1-rank trainer runs 1.020x a plain PyTorch loop on CPU, 0.996x with
    # for-loop, the plain loop's own kernel (``python -m benchmarks.train``, benchmarks/results/train.md).
    implementation: Literal["fused", "foreach", "for-loop"] = "fused"

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("weight_decay and clip_grad must be >= 0")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps.

    ``cosine``: linear warm-up to ``optimizer.lr``, then cosine decay to ``min_lr_ratio * lr`` at
    ``decay_steps`` (default: the end of training). ``wsd`` (warmup-stable-decay): warm-up, constant, then a
    linear decay over the last ``wsd_decay_fraction`` of training to ``min_lr_ratio * lr``. ``constant``:
    warm-up then constant.
    """

    # cosine, wsd (warmup-stable-decay) or constant, as described above
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 to optimizer.lr
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of optimizer.lr
    decay_steps: int | None = None  # cosine: step at which min_lr is reached; None = train_steps
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of training that decays linearly

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ValueError(f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must be > warmup_steps ({self.warmup_steps})")


@dataclass
class BatchRampupConfig:
    """MT-NLG / Megatron batch-size ramp-up: start at ``start`` samples per step and grow by ``increment``
    every ``ramp_samples / ((global_batch - start) / increment)`` consumed samples, reaching
    ``parallel.global_batch`` after ``ramp_samples`` samples. ``start: 0`` disables the ramp."""

    start: int = 0  # samples in the first step (0: no ramp)
    increment: int = 0  # samples added at each growth of the batch
    ramp_samples: int = 0  # samples consumed by the time the batch reaches parallel.global_batch

    @property
    def enabled(self) -> bool:
        return self.start > 0

    def validate(self) -> None:
        if self.enabled and (self.increment < 1 or self.ramp_samples < 1):
            raise ValueError(f"increment and ramp_samples must be >= 1 with a ramp (start={self.start})")


@dataclass
class SyntheticDataConfig:
    """Deterministic synthetic tokens (arithmetic sequences modulo the vocabulary): sample ``i`` depends only
    on ``seed`` and ``i``, so every layout sees the same data. Used by tests and the CPU demo; real runs put
    the indexed-dataset blend in ``data`` instead."""

    seq_length: int = 32  # tokens per sample
    seed: int = 1234  # seed of the sequences (validation uses seed + 1)
    documents_per_sample: int = 1  # > 1: packed documents (segment ids, document masking)

    def validate(self) -> None:
        if self.seq_length < 2 or self.documents_per_sample < 1 or self.seq_length % self.documents_per_sample:
            raise ValueError("seq_length must be >= 2 and a multiple of documents_per_sample")


@dataclass
class CheckpointConfig:
    """Periodic checkpoints (sharded model + optimizer state, train state, RNG; see ``kiln.pretrain.checkpoint``)
    every ``interval`` steps (0: only on pre-emption signals and at the end of training), keeping the newest
    ``keep_last``. ``dir`` defaults to ``<run_dir>/checkpoints``."""

    interval: int = 0  # steps between periodic checkpoints (0: only on signals and at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    dir: str | None = None  # where checkpoints go (null: <run_dir>/checkpoints)
    save_final: bool = True  # with interval > 0: also save at the last step
    # write periodic checkpoints in a background thread: the step waits only for a copy of this rank's shards
    # (host memory: one more copy of them until the write ends); the last save of a run is always synchronous
    async_save: bool = False

    def validate(self) -> None:
        if self.interval < 0:
            raise ValueError(f"interval must be >= 0 (0: no periodic saves), got {self.interval}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.async_save and self.interval == 0:
            raise ValueError(
                "async_save applies to periodic saves, and interval is 0: set interval > 0 (saves on signals and at "
                "the end of training are synchronous)"
            )


@dataclass
class EvalConfig:
    """Held-out loss / perplexity (``val_loss``, ``val_ppl``) every ``interval`` steps (0: off) and at the end of
    training, on the first ``batches`` global validation batches of ``batch_size`` samples per data-parallel
    rank (default: ``parallel.micro_batch``). The validation split is the data's (``data.validation_fraction``
    or ``data.validation``); with ``synthetic_data`` it is a synthetic source of another seed
    (``synthetic_data.seed + 1``)."""

    interval: int = 0  # steps between evaluations (0: off)
    batches: int = 8  # global validation batches per evaluation
    batch_size: int | None = None  # validation samples per data-parallel rank (null: parallel.micro_batch)
    at_start: bool = False  # also evaluate before the first step: the baseline of a fine-tuning curve
    per_source: bool = False  # SFT: a held-out loss per source too, besides the agent / general ones

    def validate(self) -> None:
        if self.interval < 0:
            raise ValueError(f"interval must be >= 0 (0: no evaluation), got {self.interval}")
        if self.batches < 1:
            raise ValueError(f"batches must be >= 1, got {self.batches}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or null: parallel.micro_batch), got {self.batch_size}")


@dataclass
class TrainRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_rampup: BatchRampupConfig = field(default_factory=BatchRampupConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # resume=true: from the newest complete checkpoint under checkpoint.dir (none yet: start fresh);
    # resume=<path>: from that checkpoint directory, or the newest complete one under that root.
    resume: bool | str = False
    # fp32: everything in fp32 (CPU, and the layout-equivalence tests). bf16: bf16 compute with fp32 master
    # weights and optimizer state kept by DeepSpeed (GPU).
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0  # weight init; the data order has its own seed in the data section
    train_steps: int = 100  # optimizer steps of the run (the schedule and the MeCo switch count them)
    log_interval: int = 10  # steps between console lines (the loss is read from the device only then)
    # Steps between the all-reduce that makes every rank agree on stop/save requests (a SIGTERM may reach
    # some ranks only). 1 = every step; each poll waits for the device, so not every step by default. It must
    # fit in the scheduler's grace period: poll steps x step time < the seconds between SIGTERM and SIGKILL.
    flag_poll_interval: int = 10
    run_dir: str = "runs/pretrain"  # logs, metrics.jsonl, W&B files and (by default) checkpoints go here
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline: files under run_dir, no network
    max_nan_steps: int = 10  # stop the run once more steps than this had a NaN/inf loss
    synthetic_data: SyntheticDataConfig | None = None
    # The indexed-dataset blend (pretrain.data); exactly one of data / synthetic_data / sft is set.
    data: DataConfig | None = None
    # Instruction tuning: the `kiln data sft` section (an SFT recipe's `data:`), read as packed conversations.
    sft: SFTDataConfig | None = None
    name: str | None = None  # the recipe's name (SFT recipes have one; `kiln data sft` names its report by it)
    # Weights to start from: a kiln model directory, a Hugging Face directory or GGUF, `smollm2`, or a training
    # checkpoint directory (its weights only). The `model` section must describe the same architecture: it is
    # what `--dry-run` plans with, and the weights are checked against it before training starts.
    init_from: str | None = None
    # micro_batch_mean: the mean over micro-batches of each micro-batch's token-mean loss (Megatron's rule; with
    # full packed sequences every micro-batch has about the same number of loss tokens). global_tokens: the sum
    # of the loss over every trainable token of the step divided by their count over all ranks, so that a
    # conversation's tokens weigh the same whichever micro-batch they fall in (SFT: masks vary a lot).
    loss_normalization: Literal["micro_batch_mean", "global_tokens"] = "micro_batch_mean"

    def validate(self) -> None:
        # Only what spans sections: each section's own hook has already run (kiln.config.validate_tree runs the
        # children first), so e.g. batch_rampup.increment >= 1 holds here. Built in Python? validate_tree(recipe).
        if self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")
        if self.log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {self.log_interval}")
        if self.flag_poll_interval < 1:
            raise ValueError(f"flag_poll_interval must be >= 1, got {self.flag_poll_interval}")
        sources = [s for s in (self.data, self.synthetic_data, self.sft) if s is not None]
        if len(sources) != 1:
            raise ValueError(
                "set exactly one of 'data' (indexed datasets, or an SFT recipe's builder section) or 'synthetic_data'"
            )
        if self.schedule.decay_steps is None and self.schedule.warmup_steps >= self.train_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be < train_steps ({self.train_steps})"
            )
        ramp, gb = self.batch_rampup, self.parallel.global_batch
        if ramp.enabled:
            if ramp.start >= gb:
                raise ValueError(f"batch_rampup.start ({ramp.start}) must be < parallel.global_batch ({gb})")
            if (gb - ramp.start) % ramp.increment:
                raise ValueError(
                    f"parallel.global_batch - batch_rampup.start ({gb} - {ramp.start}) must be a multiple of "
                    f"batch_rampup.increment ({ramp.increment})"
                )

    @property
    def seq_length(self) -> int:
        if self.synthetic_data is not None:
            return self.synthetic_data.seq_length
        if self.sft is not None:
            return self.sft.seq_length
        return self.data.seq_length  # type: ignore[union-attr]

    def layout(self, world_size: int) -> Layout:
        """The TP x PP x DP layout for ``world_size`` processes, or a ConfigError saying what does not fit."""
        p, m = self.parallel, self.model
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if world_size % (p.tp * p.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {p.tp} x {p.pp}"
            )
        dp = world_size // (p.tp * p.pp)
        if p.dp != -1 and p.dp != dp:
            raise ConfigError(
                f"world size {world_size} != parallel.tp x parallel.pp x parallel.dp = {p.tp} x {p.pp} x {p.dp} "
                f"(= {p.tp * p.pp * p.dp}); launch {p.tp * p.pp * p.dp} processes or set parallel.dp: -1"
            )
        try:
            m.validate_tp(p.tp)
        except ConfigError as e:
            raise ConfigError(f"parallel.tp: {e}") from None
        if m.num_hidden_layers < p.pp:
            raise ConfigError(
                f"model.num_hidden_layers ({m.num_hidden_layers}) must be >= parallel.pp ({p.pp}): every "
                "pipeline stage needs at least one decoder layer"
            )
        per_step = p.micro_batch * dp
        batches = [("parallel.global_batch", p.global_batch)]
        if self.batch_rampup.enabled:
            batches += [
                ("batch_rampup.start", self.batch_rampup.start),
                ("batch_rampup.increment", self.batch_rampup.increment),
            ]
        for name, value in batches:
            if value % per_step:
                raise ConfigError(
                    f"{name} ({value}) must be divisible by parallel.micro_batch x data-parallel size "
                    f"({p.micro_batch} x {dp} = {per_step})"
                )
        return Layout(tp=p.tp, pp=p.pp, dp=dp)

    def global_batch_at(self, consumed_samples: int) -> int:
        """Samples in the optimizer step that starts after ``consumed_samples`` (Megatron's ramp-up rule)."""
        ramp, gb = self.batch_rampup, self.parallel.global_batch
        if not ramp.enabled or consumed_samples >= ramp.ramp_samples:
            return gb
        increments = (gb - ramp.start) // ramp.increment
        samples_per_increment = ramp.ramp_samples / increments
        return min(gb, ramp.start + int(consumed_samples // samples_per_increment) * ramp.increment)

    def samples_before_step(self, step: int) -> int:
        """Global samples consumed by steps ``0 .. step - 1`` (the data position at the start of ``step``)."""
        consumed, done = 0, 0
        while done < step and self.batch_rampup.enabled and consumed < self.batch_rampup.ramp_samples:
            consumed += self.global_batch_at(consumed)
            done += 1
        return consumed + (step - done) * self.parallel.global_batch

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir if self.checkpoint.dir else os.path.join(self.run_dir, "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def is_sft_section(data: Any) -> bool:
    """An SFT recipe's ``data`` section (the builder's: it lists ``sources``), not a pretraining blend."""
    return isinstance(data, dict) and "sources" in data


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
    """Read a recipe YAML, apply ``key=value`` overrides (with the file's own key names: ``data.mix.eta=0.3`` in
    an SFT recipe), validate (not yet against a world size)."""
    raw = apply_overrides(read_yaml(path) if path is not None else {}, list(overrides))
    source = str(path) if path is not None else "overrides"
    if not is_sft_section(raw.get("data")):
        return build_dataclass(TrainRecipe, raw, source=source)
    raw["sft"] = raw.pop("data")
    try:
        return build_dataclass(TrainRecipe, raw, source=source)
    except ConfigError as e:  # name the key as the file spells it
        raise ConfigError(str(e).replace("key 'sft.", "key 'data.").replace("key 'sft'", "key 'data'")) from None


__all__ = [
    "BatchRampupConfig",
    "CheckpointConfig",
    "EvalConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "SyntheticDataConfig",
    "TrainRecipe",
    "load_recipe",
]
