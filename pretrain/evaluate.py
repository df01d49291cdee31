"""Held-out loss and perplexity at an interval.

The engine provides ``loss_fn(batch)``: the model's loss on one validation batch, returned either as
``(loss_sum, token_count)`` (exact token-weighted mean over batches of different sizes, the preferred form)
or as a mean loss tensor/float, weighted here by ``batch["loss_mask"].sum()``. ``loss_fn`` runs under
``torch.no_grad()``; putting the model in eval mode (and back) is the engine's business, as is pipeline
parallelism (only the last stage has a loss: other stages return ``(0, 0)``, the reduction below sums them).

With data parallelism each rank evaluates its slice of every validation batch; the sums are all-reduced over
``group`` so every rank reports the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kiln.pretrain.callbacks.base import Callback, TrainState


def evaluate(
    loss_fn: Callable[[dict[str, torch.Tensor]], Any],
    batches: Iterable[dict[str, torch.Tensor]],
    group: Any = None,
) -> dict[str, float]:
    """Token-weighted mean loss over ``batches``: ``{"val_loss", "val_ppl", "val_tokens", "val_batches"}``."""
    total = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, batches
    with torch.no_grad():
        for batch in batches:
            out = loss_fn(batch)
            if isinstance(out, tuple):
                loss_sum, count = out
                loss_sum = float(loss_sum.detach() if torch.is_tensor(loss_sum) else loss_sum)
                count = float(count.detach() if torch.is_tensor(count) else count)
            else:
                count = float(batch["loss_mask"].sum()) if "loss_mask" in batch else float(batch["labels"].numel())
                loss_sum = float(out.detach() if torch.is_tensor(out) else out) * count
            total += torch.tensor([loss_sum, count, 1.0], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=group)
    loss_sum, tokens, n = total.tolist()
    loss = loss_sum / tokens if tokens > 0 else float("nan")
    ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")
    return {"val_loss": loss, "val_ppl": ppl, "val_tokens": int(tokens), "val_batches": int(n)}


class Evaluator(Callback):
    """Evaluate every ``interval`` steps (and at the end) and hand the metrics on: inside a trainer to
    ``trainer.record_eval`` (every callback's ``on_eval``: console, metrics file, W&B), outside one to ``sink``.
    Priority 60: after the NaN guard, before the checkpointer and the loggers, so the evaluation at the end
    reaches the loggers before their ``on_train_end`` closes them. A run that stopped on an error (exit code
    != 0) is not evaluated at the end.

    Args:
        loss_fn: see `evaluate`.
        batches: a callable returning a fresh iterable of this rank's validation batches each time (e.g.
            ``lambda: data.validation.batches(micro_batch, max_batches, dp_rank, dp_size)``).
        interval: steps between evaluations; 0 disables periodic evaluation (only `run`).
        group: process group the sums are all-reduced over (None: the default group when initialised).
        at_end: also evaluate when training ends at a step that was not just evaluated.
        at_start: also evaluate at ``on_train_start`` of a run at step 0 (the starting point of the curve).
        prefix: the metric names' prefix: ``val`` (``val_loss``, ``val_ppl``, ...) or e.g. ``val_agent`` for one
            of several held-out splits.
    """

    def __init__(
        self,
        loss_fn: Callable[[dict[str, torch.Tensor]], Any],
        batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
        interval: int = 1000,
        *,
        sink: Callback | None = None,
        group: Any = None,
        at_end: bool = True,
        prefix: str = "val",
        at_start: bool = False,
    ):
        if interval < 0:
            raise ValueError(f"eval interval must be >= 0, got {interval}")
        self.loss_fn, self.batches, self.interval = loss_fn, batches, interval
        self.sink, self.group, self.at_end, self.prefix = sink, group, at_end, prefix
        self.at_start = at_start
        self.history: list[tuple[int, dict[str, float]]] = []

    priority = 60

    def run(self, state: TrainState) -> dict[str, float]:
        metrics = evaluate(self.loss_fn, self.batches(), self.group)
        if self.prefix != "val":  # one split of several (an SFT source): val_<source>_loss, ...
            metrics = {self.prefix + key[len("val") :]: value for key, value in metrics.items()}
        self.history.append((state.step, metrics))
        if self.trainer is not None:
            self.trainer.record_eval(metrics)
        elif self.sink is not None:
            self.sink.on_eval(state, metrics)
        return metrics

    def on_train_start(self, state: TrainState) -> None:
        if self.at_start and state.step == 0:
            self.run(state)

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.interval and state.step % self.interval == 0:
            self.run(state)

    def on_train_end(self, state: TrainState) -> None:
        evaluated = bool(self.history) and self.history[-1][0] == state.step
        if self.at_end and state.step > 0 and state.exit_code == 0 and not evaluated:
            self.run(state)
