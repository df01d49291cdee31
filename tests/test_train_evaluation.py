"""Held-out loss / perplexity during training (issue 5, "Evaluation"): `EngineEvaluator` passed to the real loop.

The tiny recipe trains 10 steps on one rank and at PP2 (two ranks, DeepSpeed's pipeline engine) with an
evaluation every 5 steps on 4 held-out batches (synthetic samples of another seed, packed documents). Checked:
each reported ``val_loss`` equals the token-weighted mean loss that a fresh ``KilnLlama`` loaded with the
engine's weights at that step computes by hand; ``val_ppl = exp(val_loss)``; the held-out loss falls; the
training steps are unchanged by the evaluations; and the pipeline reports the same numbers as one rank.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from kiln.pretrain.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
OVERRIDES = ["train_steps=10", "log_interval=1000", "synthetic_data.documents_per_sample=4"]
VAL_BATCHES, VAL_MICRO = 4, 2


def _train_with_eval(rank: int, world_size: int, overrides: list[str], evaluate: bool, run_dir: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.callbacks.evaluation import EngineEvaluator
    from kiln.pretrain.engine import TrainEngine, collate_indices
    from kiln.pretrain.engine.batches import SyntheticTokens
    from kiln.pretrain.model import KilnLlama
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import train

    recipe = load_recipe(TINY, [*OVERRIDES, *overrides, f"run_dir={run_dir}"])
    ctx = init_parallel(recipe.layout(world_size), timeout_s=120)
    engine = TrainEngine(recipe, ctx)
    s = recipe.synthetic_data
    held_out = SyntheticTokens(recipe.model.vocab_size, s.seq_length, seed=999, documents_per_sample=4)
    per_rank = VAL_MICRO // ctx.layout.dp

    def batches():
        for b in range(VAL_BATCHES):
            start = b * VAL_MICRO + ctx.dp_rank * per_rank
            yield collate_indices(held_out, range(start, start + per_rank))

    class ByHand(Callback):
        """At every evaluation: the same loss computed from the engine's gathered weights, without the engine."""

        def __init__(self):
            self.expected = []

        def on_eval(self, state, metrics):
            weights = engine.full_model_state()
            model = KilnLlama(recipe.model, init_seed=None)
            model.load_full_state_dict(weights)
            total, count = 0.0, 0.0
            with torch.no_grad():
                for b in range(VAL_BATCHES):
                    mb = collate_indices(held_out, range(b * VAL_MICRO, (b + 1) * VAL_MICRO))
                    loss = model(
                        mb["input_ids"],
                        position_ids=mb["position_ids"],
                        segment_ids=mb["segment_ids"],
                        labels=mb["labels"],
                        loss_mask=mb["loss_mask"],
                        reduction="sum",
                    )
                    total += float(loss)
                    count += float(mb["loss_mask"].sum())
            self.expected.append((state.step, total / count, int(count)))

    class Losses(Callback):
        def __init__(self):
            self.losses = []

        def on_step_end(self, state, metrics):
            self.losses.append(float(metrics["loss"]))

    by_hand, losses = ByHand(), Losses()
    callbacks = [losses, by_hand]  # the trainer hands every evaluation to every callback's on_eval
    evaluator = None
    if evaluate:
        evaluator = EngineEvaluator(engine, batches, interval=5)
        callbacks.append(evaluator)
    train(recipe, callbacks, ctx=ctx, loggers=False, engine=engine)
    destroy_parallel()
    return {
        "history": evaluator.history if evaluator else [],
        "expected": by_hand.expected,
        "losses": losses.losses,
    }


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run_distributed(_train_with_eval, 1, [], True, str(tmp_path_factory.mktemp("eval1")))[0]


def test_held_out_loss_at_the_interval_matches_a_hand_computation(one_rank):
    history, expected = one_rank["history"], one_rank["expected"]
    assert [step for step, _ in history] == [5, 10]  # every 5 steps; the last step is not evaluated twice
    for (step, m), (step_hand, loss, count) in zip(history, expected):
        assert step == step_hand
        assert m["val_tokens"] == count and m["val_batches"] == VAL_BATCHES
        assert math.isclose(m["val_loss"], loss, rel_tol=1e-6)
        assert math.isclose(m["val_ppl"], math.exp(loss), rel_tol=1e-9)
    assert history[1][1]["val_loss"] < history[0][1]["val_loss"] < math.log(128)


def test_evaluation_does_not_change_training(one_rank, tmp_path):
    plain = run_distributed(_train_with_eval, 1, [], False, str(tmp_path))[0]
    assert plain["losses"] == one_rank["losses"]


def test_pipeline_reports_the_same_held_out_loss(one_rank, tmp_path):
    pp2 = run_distributed(_train_with_eval, 2, ["parallel.pp=2"], True, str(tmp_path))
    for rank in pp2:  # both stages report the numbers
        assert [s for s, _ in rank["history"]] == [5, 10]
        for (_, got), (_, ref) in zip(rank["history"], one_rank["history"]):
            assert got["val_tokens"] == ref["val_tokens"]
            assert math.isclose(got["val_loss"], ref["val_loss"], rel_tol=1e-4)
