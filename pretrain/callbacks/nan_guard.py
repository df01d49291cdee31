"""Skip optimizer steps whose loss is not finite; stop the run after too many."""

from __future__ import annotations

import logging
import math
from typing import Any

from kiln.pretrain.callbacks.base import Callback, TrainState

log = logging.getLogger(__name__)


class NanGuard(Callback):
    """Count non-finite (NaN/inf) losses, tell the loop to skip those steps, stop after ``max_nan_steps``.

    Use it in two places:

    * before the optimizer step: ``if guard.check(state, loss): skip optimizer.step()`` (and zero the grads).
      ``check`` returns True for a non-finite loss, counts it in ``state.nan_steps``/``state.skipped_steps``
      and, once ``state.nan_steps`` exceeds ``max_nan_steps``, sets ``state.should_stop`` with a message and
      ``state.exit_code = 1`` (no checkpoint: the state before the bad steps is the one worth keeping).
    * or as a callback (priority 100: before the checkpointer): on ``on_step_end`` it counts the step when the
      train module reports ``metrics["skip"] = True`` (``TrainEngine`` decides the skip before its update and
      says so: no host sync here); when the metrics carry no ``skip`` it reads ``metrics["loss"]`` itself and
      sets ``metrics["skip"]`` (a step already counted by ``check`` is not counted twice).

    ``max_nan_steps`` counts over the whole run (the counter is part of TrainState, so it survives a resume);
    ``max_nan_steps=0`` stops at the first one.
    """

    priority = 100

    def __init__(self, max_nan_steps: int = 10):
        if max_nan_steps < 0:
            raise ValueError(f"max_nan_steps must be >= 0, got {max_nan_steps}")
        self.max_nan_steps = max_nan_steps
        self._checked_step: int | None = None
        self.message = ""

    @staticmethod
    def is_finite(loss: Any) -> bool:
        if hasattr(loss, "detach"):
            loss = loss.detach().float().cpu().item()
        return math.isfinite(float(loss))

    def check(self, state: TrainState, loss: Any) -> bool:
        """True when the step must be skipped (non-finite loss)."""
        self._checked_step = state.step
        if self.is_finite(loss):
            return False
        state.nan_steps += 1
        state.skipped_steps += 1
        log.warning("step %d: non-finite loss (%s): step skipped (%d so far)", state.step, loss, state.nan_steps)
        if state.nan_steps > self.max_nan_steps:
            self.message = (
                f"stopping: {state.nan_steps} steps had a non-finite loss (NaN/inf), more than max_nan_steps="
                f"{self.max_nan_steps}; the last at step {state.step}. Lower the learning rate, check the data "
                f"around sample {state.consumed_samples}, or resume from the last checkpoint."
            )
            log.error(self.message)
            state.should_stop = True
            state.exit_code = 1
            state.stop_reason = self.message
        return True

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        loss = metrics.get("loss")
        if loss is None:
            return
        if "skip" in metrics and self._checked_step is None:  # the train module decided, before its update
            if metrics["skip"]:
                self.check(state, loss)
                self._checked_step = None
            return
        # already counted by check() this step (called before or after the loop incremented state.step)
        if self._checked_step is not None and state.step in (self._checked_step, self._checked_step + 1):
            if not self.is_finite(loss):
                metrics["skip"] = True
            return
        if not self.is_finite(loss):
            metrics["skip"] = True
            self.check(state, loss)
            self._checked_step = None
