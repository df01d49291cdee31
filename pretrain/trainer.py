"""The trainer: the loop, its metrics and its cancellation. Everything else hangs off it.

What a step does (``Trainer.fit``)::

    for step in batches:                          # this rank's micro-batches, prepared ahead on a thread
        metrics = module.train_batch(...)         # forward, backward, optimizer step (or a skipped update)
        interval.add(metrics)                     # device tensors, summed on the device
        state.advance(...)                        # step, data position, tokens
        stops.poll(state)                         # every N steps: do all ranks agree to stop / save?
        if log step: callbacks.on_log(state, interval.summary())   # the only read of device metrics
        callbacks.on_step_end(state, metrics)     # NaN guard, evaluator, checkpointer, ...

The train module (``kiln.pretrain.train_module.TrainModule``; ``TrainEngine`` for DeepSpeed) owns model,
optimizer, step and checkpoint files. Callbacks (``kiln.pretrain.callbacks``) run by priority and reach the
trainer through ``callback.trainer``. ``kiln.pretrain.train.train`` builds a trainer from a recipe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.pretrain.callbacks.base import Callback, CallbackList, TrainState
from kiln.pretrain.cancellation import StopRequests
from kiln.pretrain.metrics import IntervalMetrics
from kiln.pretrain.recipe import TrainRecipe
from kiln.pretrain.schedule import LRSchedule
from kiln.pretrain.train_module import TrainModule


class Trainer:
    """Trains ``module`` on ``dataset`` (global sample index -> sample) for ``recipe.train_steps`` steps.

    Args:
        state: the run's state, e.g. after ``module.load_checkpoint`` (default: a fresh one at step 0).
        callbacks: any order; they run by ``priority``.
        prefetch: steps of batches prepared ahead on a background thread (0: on the loop thread).
    """

    def __init__(
        self,
        recipe: TrainRecipe,
        module: TrainModule,
        dataset,
        ctx: Any,
        *,
        state: TrainState | None = None,
        callbacks: Sequence[Callback] = (),
        prefetch: int = 2,
    ):
        self.recipe, self.module, self.dataset, self.ctx = recipe, module, dataset, ctx
        self.state = state if state is not None else new_state(recipe, ctx)
        self.schedule = LRSchedule(recipe.schedule, recipe.optimizer.lr, recipe.train_steps)
        self.callbacks = CallbackList(list(callbacks))
        self.callbacks.bind(self)
        self.stops = StopRequests(ctx, recipe.flag_poll_interval)
        self.prefetch = prefetch

    def fit(self) -> TrainState:
        """Run to ``train_steps`` or until stopped; returns the final state (``exit_code``: what to exit with)."""
        state, hooks, last = self.state, self.callbacks, self.recipe.train_steps
        interval = IntervalMetrics()
        with self._signals(), self._batches() as batches:
            hooks.on_train_start(state)
            interval.restart_clock()
            for step in batches:
                if state.should_stop:
                    break
                metrics = self.module.train_batch(step.micro_batches, step.global_batch, self.schedule(state.step))
                tokens = step.global_batch * self.recipe.seq_length
                interval.add(metrics, tokens)
                state.advance(step.global_batch, tokens)
                metrics.update(global_batch=step.global_batch, tokens=tokens)
                self.stops.poll(state, force=state.step == last)
                if state.step % self.recipe.log_interval == 0 or state.step == last or state.should_stop:
                    hooks.on_log(state, interval.summary())  # before a checkpoint of this step is written
                hooks.on_step_end(state, metrics)
                interval.restart_clock()
            self.stops.poll(state, force=True)  # a request that arrived after the last poll
            hooks.on_train_end(state)
        return state

    def request_stop(self, reason: str, save: bool = True) -> None:
        """Stop (saving first, with ``save``) once every rank agrees, at the next poll. Safe from any rank."""
        self.stops.request(reason, save=save)

    def record_eval(self, metrics: dict[str, Any]) -> None:
        """Evaluation metrics (from an evaluator callback) for every callback's ``on_eval``."""
        self.callbacks.on_eval(self.state, metrics)

    def _batches(self):
        from kiln.pretrain.engine.batches import StepBatches

        return StepBatches(
            self.dataset,
            self.recipe.global_batch_at,
            micro_batch=self.recipe.parallel.micro_batch,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.layout.dp,
            start=self.state.consumed_samples,
            steps=max(0, self.recipe.train_steps - self.state.step),
            prefetch=self.prefetch,
            pin_memory=self.ctx.device.type == "cuda",
        )

    def _signals(self):
        """SIGTERM / SIGUSR1 become stop-and-save requests while the loop runs (signals can only be handled on
        the main thread: a trainer run from another thread leaves them alone)."""
        return self.stops if threading.current_thread() is threading.main_thread() else contextlib.nullcontext()


def new_state(recipe: TrainRecipe, ctx: Any) -> TrainState:
    """A run's state at step 0 on this rank of ``ctx``'s layout."""
    layout = ctx.layout
    return TrainState(
        total_steps=recipe.train_steps,
        run_dir=Path(recipe.run_dir),
        rank=ctx.rank,
        world_size=ctx.world_size,
        dp_size=layout.dp,
        tp_size=layout.tp,
        pp_size=layout.pp,
    )


__all__ = ["Trainer", "new_state"]
