"""Held-out loss / perplexity during training, from a ``TrainEngine``, at any layout.

``kiln.pretrain.evaluate`` has the reduction (`evaluate`) and the interval callback (`Evaluator`); this module
gives them what they need from the trainer:

* `engine_loss_fn(engine)`: ``batch -> (loss_sum, token_count)`` of the engine's model on one validation batch
  (this rank's slice), with dropout-free eval mode around it and back to train mode after:
  - PP = 1: the DeepSpeed engine's forward (so ZeRO-3 gathers its parameters) with ``reduction="sum"``; at
    TP > 1 every TP rank computes the same full-vocabulary loss;
  - PP > 1: DeepSpeed's ``PipelineEngine.eval_batch`` on the one micro-batch; it returns the token-mean loss
    of the batch on every stage, turned into a sum with the batch's loss-mask count.
  Token counts are those of the loss mask (and labels != -100), as in training.
* `validation_batches(data, micro_batch, ctx, max_batches)`: a callable giving this DP rank's slices of the
  validation set (``PretrainData.validation``: a held-out split, the plain twins under MeCo) in order, the same
  global batches at every DP size.
* `EngineEvaluator(engine, batches, interval)`: an `Evaluator` wired to both, reducing over the data-parallel
  group only (TP and PP ranks of one replica already hold the same numbers). ``kiln.pretrain.train`` adds one
  when ``eval.interval`` > 0; inside a trainer its metrics go to every callback's ``on_eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kiln.pretrain.callbacks.base import Callback
from kiln.pretrain.engine.batches import trainable_tokens
from kiln.pretrain.evaluate import Evaluator, evaluate

Batch = dict[str, torch.Tensor]


def engine_loss_fn(engine) -> Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]:
    """``batch -> (loss_sum, token_count)`` of ``engine`` (a ``kiln.pretrain.engine.TrainEngine``) on this rank's
    slice of a validation batch; see the module docstring."""

    def counted(batch: Batch) -> torch.Tensor:
        return trainable_tokens(batch).sum()

    def plain(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = engine._to_device(batch)
        segment_ids = mb.get("segment_ids") if engine.cfg.document_masking else None
        ds = engine.engine
        was_training = ds.training
        ds.eval()
        try:
            with torch.no_grad():
                loss_sum = ds(
                    mb["input_ids"],
                    position_ids=mb.get("position_ids"),
                    segment_ids=segment_ids,
                    labels=mb["labels"],
                    loss_mask=mb.get("loss_mask"),
                    reduction="sum",
                )
        finally:
            ds.train(was_training)
        return loss_sum.detach().double().cpu(), counted(batch)

    def pipelined(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ds = engine.engine
        was_training = ds.training
        try:
            mean = ds.eval_batch(iter([engine.pipeline_inputs(batch)]), num_micro_batches=1, bcast_loss=True)
        finally:
            ds.train(was_training)
        count = counted(batch)
        return mean.detach().double().cpu() * count, count

    return pipelined if engine.pipelined else plain


def validation_batches(data, micro_batch: int, ctx, max_batches: int | None = None) -> Callable[[], Iterable[Batch]]:
    """This DP rank's validation batches of ``data`` (a ``PretrainData`` with a validation split, or any
    ``ValidationData``): ``micro_batch`` samples per rank, global batches of ``micro_batch x DP`` samples."""
    validation = getattr(data, "validation", data)
    if validation is None:
        raise ValueError(
            "the data has no validation split: set data.validation_fraction or data.validation in the recipe"
        )
    dp_rank, dp_size = ctx.dp_rank, ctx.layout.dp
    return lambda: validation.batches(micro_batch, max_batches, dp_rank, dp_size)


class EngineEvaluator(Evaluator):
    """`Evaluator` on a ``TrainEngine``: held-out loss / perplexity every ``interval`` steps (and at the end).

    Args:
        engine: the ``TrainEngine`` the loop trains (build it yourself and pass it to ``train(engine=...)``).
        batches: callable returning a fresh iterable of this rank's validation batches
            (`validation_batches`).
        interval: steps between evaluations (0: only at the end / on `run`).
        sink: outside a trainer, receives ``on_eval(state, metrics)``. The metrics are also kept in
            ``history`` as ``(step, {"val_loss", "val_ppl", "val_tokens", "val_batches"})``.
    """

    def __init__(
        self,
        engine,
        batches: Callable[[], Iterable[Batch]],
        interval: int = 1000,
        *,
        sink: Callback | None = None,
        at_end: bool = True,
        prefix: str = "val",
        at_start: bool = False,
    ):
        super().__init__(
            engine_loss_fn(engine),
            batches,
            interval=interval,
            sink=sink,
            group=engine.ctx.dp_group,
            at_end=at_end,
            prefix=prefix,
            at_start=at_start,
        )


def evaluate_engine(engine, batches: Iterable[Batch]) -> dict[str, Any]:
    """One evaluation outside the loop (e.g. after training): the same numbers `EngineEvaluator` reports."""
    return evaluate(engine_loss_fn(engine), batches, group=engine.ctx.dp_group)


__all__ = ["EngineEvaluator", "engine_loss_fn", "evaluate_engine", "validation_batches"]
