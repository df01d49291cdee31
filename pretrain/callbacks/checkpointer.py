"""Save a checkpoint every ``checkpoint.interval`` steps, at the end, and when a stop/save request was agreed.

What a checkpoint holds and how it is written is the train module's (``TrainModule.save_checkpoint``); this
callback only decides when. A run the NaN guard stopped (exit code 1) saves nothing more: the checkpoints from
before its bad steps are the ones worth resuming from.
"""

from __future__ import annotations

from typing import Any

from kiln.pretrain.callbacks.base import Callback, TrainState


class Checkpointer(Callback):
    """Runs after the NaN guard and the evaluator (priority 50), before the loggers.

    Args:
        manager: the ``kiln.pretrain.checkpoint.CheckpointManager`` of the run's checkpoint root.
        interval: steps between periodic checkpoints (0: none, only on request).
        save_final: also save at the last step (when ``interval`` > 0).
    """

    priority = 50

    def __init__(self, manager, interval: int, save_final: bool = True):
        self.manager, self.interval, self.save_final = manager, interval, save_final
        self.last_saved = -1
        self.saved: list[int] = []

    def on_train_start(self, state: TrainState) -> None:
        self.last_saved = state.step if state.step > 0 else -1  # a resumed run starts at a saved step

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        periodic = self.interval > 0 and state.step % self.interval == 0
        final = self.save_final and self.interval > 0 and state.step == state.total_steps
        if state.exit_code == 0 and (state.should_save or periodic or final):
            self._save(state)

    def on_train_end(self, state: TrainState) -> None:
        if state.exit_code == 0 and state.should_save and self.last_saved != state.step:
            self._save(state)  # e.g. a stop request agreed at the poll after the last step
        self.trainer.module.finish_checkpoints(self.manager)  # a save still written in the background

    def _save(self, state: TrainState) -> None:
        self.trainer.module.save_checkpoint(self.manager, state)
        state.should_save = False
        self.last_saved = state.step
        self.saved.append(state.step)


__all__ = ["Checkpointer"]
