"""Callback protocol and the mutable train state shared between the train loop and its hooks.

The train loop owns a :class:`TrainState` and calls, in order:

* ``on_train_start(state)`` once, after model/optimizer/data are built (and after a resume);
* ``on_step_end(state, metrics)`` after every optimizer step (``state.step`` already incremented);
* ``on_eval(state, metrics)`` after every evaluation;
* ``on_train_end(state)`` once, also on early stop.

Callbacks communicate back through the state flags (``should_stop``, ``should_save``) and, for a
single step, through ``metrics["skip"]`` (see :class:`kiln.pretrain.callbacks.nan_guard.NanGuard`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


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
    """Base class: every hook is a no-op. Subclasses override what they need."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class CallbackList(Callback):
    """Fan a hook out to several callbacks, in order."""

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks: list[Callback] = list(callbacks or [])

    def append(self, cb: Callback) -> None:
        self.callbacks.append(cb)

    def on_train_start(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state, metrics)

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_eval(state, metrics)

    def on_train_end(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state)
