"""The loop's evaluation wiring (recipe ``eval.*``) and the NaN/inf step skip (issue 5, "Observability" and
"Evaluation"), on the tiny recipe at one rank.

* ``eval.interval=2``: ``train()`` builds the evaluator itself; ``val_loss``/``val_ppl`` records land in
  ``metrics.jsonl`` at steps 2, 4, ... with finite values.
* A forward hook makes the loss NaN at one step: that step's update is skipped (the weights after it equal the
  weights before it), it is counted once, and training continues with finite losses; at one rank (ZeRO 0) and
  at DP2 with ZeRO 1, 2 and 3 (PP = 1), and under PP2 (ZeRO 0 and 1, bf16), TP2xPP2 and PP2xDP2 with the hook
  on the last stage's final norm (``kiln.pretrain.engine.deepspeed_adapter.install_pipeline_nonfinite_skip``): AdamW's step count and DeepSpeed's
  counters show the skip too.
  With ``max_nan_steps=0`` the first NaN stops the run with exit code 1 and a message naming the setting.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from kiln.pretrain.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")


def _train_eval(rank: int, world_size: int, run_dir: str) -> list[dict]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import train

    recipe = load_recipe(
        TINY, ["train_steps=6", "log_interval=1", "eval.interval=2", "eval.batches=2", f"run_dir={run_dir}"]
    )
    ctx = init_parallel(recipe.layout(world_size), timeout_s=120)
    train(recipe, ctx=ctx)
    destroy_parallel()
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _final_norm(engine):
    """The model's final RMSNorm: ``engine.module.norm`` at PP = 1; under PP the module named ``<i>.norm`` of the
    last stage (None on the other stages)."""
    if not engine.pipelined:
        return engine.module.norm
    norms = [m for name, m in engine.module.named_modules() if name.rsplit(".", 1)[-1] == "norm"]
    assert len(norms) == (1 if engine.engine.is_last_stage() else 0), [n for n, _ in engine.module.named_modules()]
    return norms[0] if norms else None


def _train_nan(rank: int, world_size: int, overrides: list[str], nan_at: int, run_dir: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.engine.state import optimizer_step
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import train

    recipe = load_recipe(TINY, ["train_steps=5", "log_interval=1", f"run_dir={run_dir}", *overrides])
    ctx = init_parallel(recipe.layout(world_size), timeout_s=120)
    engine = TrainEngine(recipe, ctx)
    poison = {"on": False}

    def hook(module, args, output):
        return output * float("nan") if poison["on"] else output

    norm = _final_norm(engine)
    if norm is not None:  # under PP only the last stage holds the final norm
        norm.register_forward_hook(hook)

    class Watch(Callback):
        def __init__(self):
            self.weights, self.losses, self.skips, self.adam_steps = {}, [], [], []
            self.weights[0] = engine.full_model_state()

        def on_step_end(self, state, metrics):
            self.weights[state.step] = engine.full_model_state()
            self.losses.append(float(metrics["loss"]))
            self.skips.append(bool(metrics.get("skip")))
            self.adam_steps.append(optimizer_step(engine))
            poison["on"] = state.step + 1 == nan_at  # the next step's loss is NaN

    watch = Watch()
    poison["on"] = nan_at == 1
    state = train(recipe, [watch], ctx=ctx, loggers=False, engine=engine)
    destroy_parallel()
    same = {
        step: all(torch.equal(watch.weights[step][k], watch.weights[step - 1][k]) for k in watch.weights[step])
        for step in sorted(watch.weights)
        if step > 0
    }
    return {
        "same": same,
        "losses": watch.losses,
        "skips": watch.skips,
        "adam_steps": watch.adam_steps,
        "ds_steps": (engine.engine.global_steps, engine.engine.skipped_steps, engine.engine.global_samples),
        "nan_steps": state.nan_steps,
        "step": state.step,
        "exit_code": state.exit_code,
        "stop_reason": state.stop_reason,
    }


def test_eval_interval_writes_val_loss_to_the_metrics_file(tmp_path):
    records = run_distributed(_train_eval, 1, str(tmp_path))[0]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        assert math.isfinite(r["val_loss"]) and math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.parametrize(
    ("world_size", "zero_stage"),
    [(1, 0), (1, 1), (2, 1), (2, 2), (2, 3)],
    ids=["1rank", "1rank-z1", "dp2-z1", "dp2-z2", "dp2-z3"],
)
def test_nan_loss_skips_the_update_and_training_continues(world_size, zero_stage, tmp_path):
    outs = run_distributed(_train_nan, world_size, [f"parallel.zero_stage={zero_stage}"], 3, str(tmp_path))
    assert all(o["same"] == outs[0]["same"] and o["nan_steps"] == 1 for o in outs)  # every rank agrees
    out = outs[0]
    assert out["step"] == 5 and out["exit_code"] == 0
    assert out["nan_steps"] == 1
    assert out["skips"] == [False, False, True, False, False]
    assert math.isnan(out["losses"][2])
    assert out["same"][3]  # step 3 (NaN) left the weights as they were
    assert not out["same"][2] and not out["same"][4] and not out["same"][5]  # the others update them
    assert all(math.isfinite(loss) for i, loss in enumerate(out["losses"]) if i != 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        (2, ["parallel.pp=2", "parallel.zero_stage=1"]),
        (2, ["parallel.pp=2", "parallel.zero_stage=0"]),
        (4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"]),
        (4, ["parallel.pp=2", "parallel.zero_stage=0"]),
        (2, ["parallel.pp=2", "parallel.zero_stage=1", "precision=bf16"]),  # DeepSpeed's BF16_Optimizer
    ],
    ids=["pp2-z1", "pp2-z0", "tp2pp2-z1", "pp2dp2-z0", "pp2-z1-bf16"],
)
def test_nan_loss_skips_the_pipeline_update(world_size, overrides, tmp_path):
    """PP > 1 (tied embeddings, as the tiny recipe has): the update is suppressed inside DeepSpeed's pipeline
    schedule (``kiln.pretrain.engine.deepspeed_adapter.install_pipeline_nonfinite_skip``), bitwise, with AdamW's step count held back by one."""
    outs = run_distributed(_train_nan, world_size, overrides, 3, str(tmp_path))
    for o in outs:  # every rank agrees
        assert (o["same"], o["skips"], o["adam_steps"], o["nan_steps"]) == (
            outs[0]["same"], outs[0]["skips"], outs[0]["adam_steps"], 1
        )  # fmt: skip
        assert o["ds_steps"] == (5, 1, 5 * 8)  # DeepSpeed counted the skipped step as its own overflow skip
    out = outs[0]
    assert out["step"] == 5 and out["exit_code"] == 0
    assert out["skips"] == [False, False, True, False, False]
    assert out["adam_steps"] == [1, 2, 2, 3, 4]  # the NaN step did not advance AdamW
    assert math.isnan(out["losses"][2])
    assert out["same"][3]  # the full weights after the NaN step equal those before it
    assert not out["same"][2] and not out["same"][4] and not out["same"][5]
    assert all(math.isfinite(loss) for i, loss in enumerate(out["losses"]) if i != 2)


def test_max_nan_steps_stops_the_run(tmp_path):
    out = run_distributed(_train_nan, 1, ["max_nan_steps=0"], 2, str(tmp_path))[0]
    assert out["step"] == 2 and out["exit_code"] == 1 and out["nan_steps"] == 1
    assert "max_nan_steps=0" in out["stop_reason"] and "non-finite loss" in out["stop_reason"]
    assert out["same"][2]
