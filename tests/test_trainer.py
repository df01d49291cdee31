"""The Trainer on its own (no DeepSpeed, no process group): a scripted train module whose losses are known, so
the loop's bookkeeping is checked exactly: log steps and interval means, checkpoint steps, stop requests, the
final evaluation reaching the metrics file, the data order with and without the prefetch thread, a resumed
start, and a data error raised at the step that needed the batch."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kiln.parallel.layout import Layout
from kiln.pretrain.callbacks import Callback, Checkpointer, MetricsFile, NanGuard, read_metrics
from kiln.pretrain.checkpoint import CheckpointManager
from kiln.pretrain.engine.batches import SyntheticTokens
from kiln.pretrain.evaluate import Evaluator
from kiln.pretrain.recipe import load_recipe
from kiln.pretrain.train_module import TrainModule
from kiln.pretrain.trainer import Trainer

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny.yaml")


class ScriptedModule(TrainModule):
    """Loss of step k (0-based) = ``losses[k]``; a non-finite one is a skipped update, as TrainEngine reports."""

    def __init__(self, losses):
        self.losses = list(losses)
        self.first_ids: list[int] = []  # the first token of each step's first micro-batch: the data order
        self.saved: list[int] = []
        self.finished = False

    def train_batch(self, micro_batches, global_batch, lr):
        k = len(self.first_ids)
        self.first_ids.append(int(micro_batches[0]["input_ids"][0, 0]))
        loss = torch.tensor(float(self.losses[k]))
        return {"loss": loss, "grad_norm": torch.tensor(0.5), "lr": lr, "skip": not math.isfinite(self.losses[k])}

    def save_checkpoint(self, manager, state):
        self.saved.append(state.step)
        return manager.final_dir(state.step)

    def load_checkpoint(self, path, state):
        return {}

    def finish_checkpoints(self, manager):
        self.finished = True


def _ctx():
    return SimpleNamespace(rank=0, world_size=1, layout=Layout(tp=1, pp=1, dp=1), dp_rank=0, device=torch.device("cpu"))


def _setup(tmp_path, overrides, losses):
    recipe = load_recipe(TINY, [f"run_dir={tmp_path}", *overrides])
    s = recipe.synthetic_data
    data = SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed, s.documents_per_sample)
    return recipe, data, ScriptedModule(losses)


def test_log_steps_interval_means_checkpoints_and_final_eval(tmp_path):
    recipe, data, module = _setup(tmp_path, ["train_steps=7", "log_interval=3"], [1, 2, 3, 4, float("nan"), 6, 7])
    logged = []

    class Logs(Callback):
        def on_log(self, state, metrics):
            logged.append((state.step, metrics["loss"], metrics["steps"], metrics["skipped"]))

    checkpointer = Checkpointer(CheckpointManager(tmp_path / "ckpt"), interval=2)
    evaluator = Evaluator(lambda b: (torch.tensor(1.5), 1), lambda: [{}], interval=0)  # only at the end
    callbacks = [MetricsFile(tmp_path), Logs(), evaluator, checkpointer, NanGuard(max_nan_steps=3)]
    state = Trainer(recipe, module, data, _ctx(), callbacks=callbacks).fit()
    assert state.step == 7 and state.consumed_samples == 56 and state.tokens == 56 * recipe.seq_length
    assert logged == [(3, 2.0, 3, 0), (6, (4 + 6) / 2, 3, 1), (7, 7.0, 1, 0)]
    assert state.nan_steps == 1 and state.skipped_steps == 1 and state.exit_code == 0
    assert module.saved == [2, 4, 6, 7] and module.finished  # every 2 steps, and the last
    metrics = read_metrics(tmp_path)
    assert [r["step"] for r in metrics["train"]] == [3, 6, 7]
    assert [(r["step"], r["val_loss"]) for r in metrics["eval"]] == [(7, 1.5)]  # before the file closed


def test_prefetch_thread_reads_the_same_samples_and_resume_starts_at_the_data_position(tmp_path):
    orders = {}
    for prefetch in (0, 2):
        recipe, data, module = _setup(tmp_path, ["train_steps=6"], [1.0] * 6)
        Trainer(recipe, module, data, _ctx(), prefetch=prefetch).fit()
        orders[prefetch] = module.first_ids
    assert orders[0] == orders[2] and len(set(orders[0])) > 1
    expected = [int(data[8 * k]["input_ids"][0]) for k in range(6)]  # rank 0 starts each global batch of 8
    assert orders[0] == expected
    recipe, data, module = _setup(tmp_path, ["train_steps=6"], [1.0] * 6)
    trainer = Trainer(recipe, module, data, _ctx())
    trainer.state.step, trainer.state.consumed_samples = 4, 32  # as a resumed checkpoint sets it
    trainer.fit()
    assert module.first_ids == expected[4:]


def test_a_stop_request_is_agreed_at_the_next_poll_and_saves(tmp_path):
    recipe, data, module = _setup(tmp_path, ["train_steps=10"], [1.0] * 10)

    class StopAt(Callback):
        def on_step_end(self, state, metrics):
            if state.step == 3:
                self.trainer.request_stop("enough")

    checkpointer = Checkpointer(CheckpointManager(tmp_path / "ckpt"), interval=0)
    state = Trainer(recipe, module, data, _ctx(), callbacks=[StopAt(), checkpointer]).fit()
    # one process polls at every step: the request made during step 3 is agreed at step 4's poll
    assert state.step == 4 and state.should_stop and state.stop_reason == "enough" and module.saved == [4]


def test_a_signal_stops_the_run_at_the_next_poll_with_a_checkpoint(tmp_path):
    recipe, data, module = _setup(tmp_path, ["train_steps=10"], [1.0] * 10)

    class Signal(Callback):
        def on_step_end(self, state, metrics):
            if state.step == 5:
                signal.raise_signal(signal.SIGTERM)

    checkpointer = Checkpointer(CheckpointManager(tmp_path / "ckpt"), interval=0)
    before = signal.getsignal(signal.SIGTERM)
    state = Trainer(recipe, module, data, _ctx(), callbacks=[Signal(), checkpointer]).fit()
    assert state.step == 6 and module.saved == [6] and "SIGTERM" in state.stop_reason and state.exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is gone


def test_a_data_error_surfaces_at_the_step_that_needs_the_batch(tmp_path):
    recipe, data, module = _setup(tmp_path, ["train_steps=6"], [1.0] * 6)

    class Broken:
        def __getitem__(self, i):
            if i >= 24:
                raise ValueError(f"sample {i}: corrupt")
            return data[i]

    with pytest.raises(ValueError, match="sample 24: corrupt"):
        Trainer(recipe, module, Broken(), _ctx(), prefetch=2).fit()
    assert len(module.first_ids) == 3  # steps 0-2 trained; step 3 needed sample 24


def test_signals_are_pending_until_the_poll_agrees():
    from kiln.pretrain.callbacks.base import TrainState
    from kiln.pretrain.cancellation import StopRequests

    state = TrainState(step=7)
    before = signal.getsignal(signal.SIGTERM)
    stops = StopRequests(SimpleNamespace(world_size=1), poll_interval=10).install()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert not state.should_stop and stops.stop  # pending on this rank only
        stops.poll(state)
        assert state.should_save and state.should_stop and "SIGUSR1" in state.stop_reason
        signal.raise_signal(signal.SIGTERM)
        assert stops.received == [signal.SIGUSR1, signal.SIGTERM]
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ValueError, match="poll_interval must be >= 1"):
        StopRequests(SimpleNamespace(world_size=1), poll_interval=0)
