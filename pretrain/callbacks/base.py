"""Callback protocol and the mutable train state shared between the trainer and its hooks.

The trainer (``kiln.pretrain.trainer.Trainer``) owns a :class:`TrainState` and calls, in order:

* ``on_train_start(state)`` once, after model/optimizer/data are built (and after a resume);
* ``on_step_end(state, metrics)`` after every optimizer step (``state.step`` already incremented). The metric
  values may be tensors still on the device (``loss``, ``grad_norm``): reading them (``float(...)``) waits for
  the device, so per-step hooks should not, unless they must;
* ``on_log(state, metrics)`` every ``log_interval`` steps and at the last step, with plain numbers summarised
  over the interval (``kiln.pretrain.metrics.IntervalMetrics``): what loggers write;
* ``on_eval(state, metrics)`` after every evaluation;
* ``on_train_end(state)`` once, also on early stop.

Callbacks run by ``priority``, highest first (ties in the order they were given): the NaN guard (100) sees a
step before the evaluator (60) and the checkpointer (50), which run before throughput (40) and the loggers (0),
so that an evaluation at the end reaches the loggers before they close. ``callback.trainer`` is the trainer
that runs them (None outside one). Callbacks communicate back through the state flags (``should_stop``,
``should_save``) and, for a single step, through ``metrics["skip"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.pretrain.trainer import Trainer

# What a checkpoint keeps of a TrainState, and so what a resumed run starts from: the data position and the
# counters of the run. World info and the control flags belong to the run that is going on.
CHECKPOINTED_FIELDS = ("step", "consumed_samples", "tokens", "nan_steps", "skipped_steps", "extra")


@dataclass
class TrainState:
    """Progress counters and control flags of one training run.

    ``step`` counts completed optimizer steps; ``consumed_samples`` is the global sample index of the
    next sample to draw (the data position); ``tokens`` counts trained tokens (samples * seq_length).
    """

    step: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    total_steps: int = 0
    run_dir: Path | None = None
    # world info
    rank: int = 0
    world_size: int = 1
    dp_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    # control flags, set by callbacks / signal handlers, read by the loop
    should_stop: bool = False
    should_save: bool = False
    stop_reason: str = ""
    exit_code: int = 0  # what the process should exit with once the loop ends (NanGuard sets 1)
    # counters that survive a resume
    nan_steps: int = 0
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def request_stop(self, reason: str, save: bool = True) -> None:
        self.should_stop = True
        self.should_save = self.should_save or save
        if not self.stop_reason:
            self.stop_reason = reason

    def advance(self, samples: int, tokens: int) -> None:
        """One optimizer step done: it consumed ``samples`` global samples holding ``tokens`` tokens."""
        self.step += 1
        self.consumed_samples += samples
        self.tokens += tokens

    def checkpointed(self) -> dict[str, Any]:
        """The fields a checkpoint keeps (`CHECKPOINTED_FIELDS`), as JSON-ready values."""
        return {name: getattr(self, name) for name in CHECKPOINTED_FIELDS}

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the checkpointed fields of ``saved`` (a `checkpointed` dict, or a whole old `to_dict`)."""
        for name in CHECKPOINTED_FIELDS:
            if name in saved:
                setattr(self, name, saved[name])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir) if self.run_dir is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("run_dir") is not None:
            known["run_dir"] = Path(known["run_dir"])
        return cls(**known)


class Callback:
    """Base class: every hook is a no-op. Subclasses override what they need.

    ``priority``: higher runs first (see the module docstring). ``trainer``: set by the trainer that runs the
    callback, so a callback can reach the train module, the recipe or ``trainer.record_eval``."""

    priority: int = 0
    trainer: Trainer | None = None

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_log(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class CallbackList(Callback):
    """Fan a hook out to several callbacks, highest ``priority`` first (a stable sort: ties keep their order)."""

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks: list[Callback] = sorted(callbacks or [], key=lambda cb: -cb.priority)

    def append(self, cb: Callback) -> None:
        self.callbacks = sorted([*self.callbacks, cb], key=lambda cb: -cb.priority)

    def bind(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.trainer = trainer

    def on_train_start(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state, metrics)

    def on_log(self, state: TrainState, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(state, metrics)

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_eval(state, metrics)

    def on_train_end(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state)
