"""Observability callbacks: FLOPs/MFU numbers, console line, metrics file, W&B offline files, NaN guard, eval."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kiln.pretrain.callbacks import (
    CallbackList,
    ConsoleLogger,
    MetricsFile,
    NanGuard,
    Throughput,
    TrainState,
    WandbLogger,
    find_offline_runs,
    flops_per_token,
    format_duration,
    peak_flops_per_device,
    read_metrics,
    read_wandb_history,
)
from kiln.pretrain.callbacks.flops import device_family
from kiln.pretrain.config import ModelConfig
from kiln.pretrain.evaluate import Evaluator, evaluate
from kiln.pretrain.metrics import IntervalMetrics
from kiln.pretrain.model import full_shapes


def test_flops_per_token_counts_every_matmul_and_attention():
    cfg = ModelConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    shapes = full_shapes(cfg)
    matmul = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and not n.startswith("embed_tokens"))
    matmul += cfg.vocab_size * cfg.hidden_size  # the tied LM head still multiplies
    seq = 128
    assert flops_per_token(cfg, seq) == 6 * matmul + 12 * 3 * 64 * seq
    assert flops_per_token(cfg, seq, causal=True) == 6 * matmul + 6 * 3 * 64 * seq
    # PaLM's 6N + 12*L*H*Q*T for a GPT-3 175B-like shape (MHA, 4x MLP has 2 matrices; SwiGLU 3 at 8/3 h)
    big = ModelConfig(
        vocab_size=50257, hidden_size=12288, intermediate_size=32768, num_hidden_layers=96, num_attention_heads=96,
        num_key_value_heads=96, head_dim=128,
    )  # fmt: skip
    n = 96 * (4 * 12288**2 + 3 * 12288 * 32768) + 12288 * 50257
    assert flops_per_token(big, 2048) == pytest.approx(6 * n + 12 * 96 * 12288 * 2048, rel=1e-12)


def test_peak_flops_table_and_override():
    assert device_family("NVIDIA H100 80GB HBM3") == "h100" and device_family("NVIDIA A100-SXM4-40GB") == "a100"
    assert peak_flops_per_device("bfloat16", "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("bfloat16", "NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("bfloat16", "Some Unknown GPU") is None
    assert peak_flops_per_device(override=1e12) == 1e12
    assert peak_flops_per_device("float32") > 1e8  # CPU: measured matmul rate


def test_throughput_and_console_line():
    lines: list[str] = []
    state = TrainState(total_steps=20, world_size=4)
    hooks = CallbackList([ConsoleLogger(print_fn=lines.append), Throughput(flops_per_token=1e9, peak_flops=1e13)])
    assert [type(cb).__name__ for cb in hooks.callbacks] == ["Throughput", "ConsoleLogger"]  # by priority
    hooks.on_train_start(state)
    summaries = []
    for step, seconds, loss in ((5, 0.5, 4.0), (10, 1.0, 9.0)):
        state.step, state.tokens = step, step * 4096
        metrics = {"loss": loss, "lr": 3e-4, "grad_norm": 0.5, "tokens": 4096, "steps": 5, "step_time_s": seconds}
        hooks.on_log(state, metrics)
        summaries.append(metrics)
    assert [m["tokens_per_s"] for m in summaries] == [8192.0, 4096.0]
    assert summaries[0]["tflops_per_device"] == pytest.approx(8192 * 1e9 / 4 / 1e12)
    assert summaries[0]["mfu"] == pytest.approx(summaries[0]["tflops_per_device"] * 1e12 / 1e13)
    assert len(lines) == 2
    # interval 1: tokens/s 8192, TFLOP/s/dev 8192*1e9/4 = 2.048, MFU 20.5%, ETA 15 steps * 0.5 s
    assert lines[0] == (
        "step 5/20 | loss 4.0000 | lr 3.000e-04 | grad_norm 0.500 | tokens/s 8,192 | TFLOP/s/dev 2.05 | MFU 20.5% "
        "| ETA 0m08s"
    )
    assert "loss 9.0000" in lines[1] and "tokens/s 4,096" in lines[1] and "MFU 10.2%" in lines[1]
    assert "ETA 0m10s" in lines[1]
    assert format_duration(3 * 86400 + 3600 * 2 + 60) == "3d02h01m" and format_duration(3725) == "1h02m"


def test_interval_metrics_mean_over_counted_steps_and_one_summary():
    interval = IntervalMetrics()
    steps = [
        {"loss": torch.tensor(2.0), "grad_norm": torch.tensor(0.5), "lr": 1e-3, "skip": False},
        {"loss": torch.tensor(float("nan")), "grad_norm": float("nan"), "lr": 2e-3, "skip": True},
        {"loss": torch.tensor(4.0), "grad_norm": torch.tensor(0.25), "lr": 3e-3, "skip": False, "global_batch": 8},
    ]
    for metrics in steps:
        interval.add(metrics, tokens=256)
        interval.restart_clock()
    out = interval.summary()
    assert out["loss"] == 3.0 and out["grad_norm"] == 0.25 and out["lr"] == 3e-3 and out["global_batch"] == 8
    assert out["steps"] == 3 and out["skipped"] == 1 and out["interval_tokens"] == 768 and out["skip"] is True
    assert all(isinstance(out[k], float) for k in ("loss", "grad_norm", "step_time_s"))
    interval.add({"loss": torch.tensor(float("nan")), "skip": True}, tokens=256)
    again = interval.summary()  # the next interval starts empty
    assert math.isnan(again["loss"]) and again["steps"] == 1 and again["skipped"] == 1


def test_metrics_file_round_trip(tmp_path):
    state = TrainState(run_dir=tmp_path, total_steps=4)
    mf = MetricsFile()
    mf.on_train_start(state)
    for step in range(1, 5):
        state.step, state.tokens = step, step * 100
        mf.on_log(state, {"loss": torch.tensor(1.0 / step), "lr": 1e-3, "note": "x", "bad": float("nan")})
    mf.on_eval(state, {"val_loss": 0.5, "val_ppl": math.exp(0.5)})
    # a resume from step 2 rewrites steps 3 and 4
    state.step = 3
    mf.on_log(state, {"loss": 0.1})
    mf.on_train_end(state)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and json.loads(lines[0])["bad"] is None
    data = read_metrics(tmp_path)
    assert [r["step"] for r in data["train"]] == [1, 2, 3, 4]
    assert data["train"][2]["loss"] == 0.1 and data["train"][1]["loss"] == 0.5 and "note" not in data["train"][0]
    assert data["eval"][0]["val_loss"] == 0.5 and data["train"][0]["tokens_total"] == 100


def test_nan_guard_counts_skips_and_stops():
    guard = NanGuard(max_nan_steps=2)
    state = TrainState(total_steps=100, consumed_samples=64)
    losses = [1.0, float("nan"), 2.0, float("inf"), torch.tensor(float("nan")), 3.0]
    skipped = []
    for loss in losses:
        skip = guard.check(state, loss)
        skipped.append(skip)
        metrics = {"loss": loss}
        state.step += 1
        guard.on_step_end(state, metrics)  # already counted by check(): not counted twice
        assert metrics.get("skip", False) == skip
        if state.should_stop:
            break
    assert skipped == [False, True, False, True, True]
    assert state.nan_steps == 3 and state.skipped_steps == 3 and state.should_stop and state.exit_code == 1
    assert "3 steps had a non-finite loss" in state.stop_reason and "max_nan_steps=2" in state.stop_reason
    assert not state.should_save
    # callback-only use: metrics["loss"] decides, and metrics["skip"] tells the loop
    only_cb, st = NanGuard(max_nan_steps=0), TrainState()
    m = {"loss": 1.5}
    only_cb.on_step_end(st, m)
    assert "skip" not in m and st.nan_steps == 0
    m = {"loss": float("nan")}
    st.step = 1
    only_cb.on_step_end(st, m)
    assert m["skip"] and st.nan_steps == 1 and st.should_stop and "max_nan_steps=0" in only_cb.message


def test_evaluate_token_weighted_and_evaluator_interval(tmp_path):
    batches = [
        {"labels": torch.zeros(2, 4), "loss_mask": torch.ones(2, 4)},  # 8 tokens
        {"labels": torch.zeros(2, 4), "loss_mask": torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]])},  # 2 tokens
    ]
    means = iter([1.0, 3.0])
    out = evaluate(lambda b: torch.tensor(next(means)), batches)
    assert out["val_loss"] == pytest.approx((8 * 1.0 + 2 * 3.0) / 10) and out["val_tokens"] == 10
    assert out["val_ppl"] == pytest.approx(math.exp(1.4)) and out["val_batches"] == 2
    sums = evaluate(lambda b: (torch.tensor(2.0), 4), batches)
    assert sums["val_loss"] == 0.5 and sums["val_tokens"] == 8
    state = TrainState(run_dir=tmp_path, total_steps=7)
    mf = MetricsFile()
    hooks = CallbackList([mf])
    ev = Evaluator(lambda b: (torch.tensor(float(state.step)), 1), lambda: batches, interval=3, sink=hooks)
    hooks.append(ev)
    hooks.on_train_start(state)
    for step in range(1, 8):
        state.step = step
        hooks.on_step_end(state, {"loss": 1.0})
    hooks.on_train_end(state)
    assert [s for s, _ in ev.history] == [3, 6, 7]
    assert [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path)["eval"]] == [(3, 3.0), (6, 6.0), (7, 7.0)]


def test_wandb_offline_run_files_hold_the_logged_metrics(tmp_path):
    """In a subprocess with WANDB_MODE=offline and WANDB_DIR in tmp (no network, nothing under $HOME)."""
    run_dir = tmp_path / "run"
    script = f"""
import torch
from kiln.pretrain.callbacks import CallbackList, TrainState, Throughput, WandbLogger
state = TrainState(run_dir=__import__("pathlib").Path({str(run_dir)!r}), total_steps=5)
hooks = CallbackList([Throughput(flops_per_token=1e6, peak_flops=1e12), WandbLogger(project="t", config={{"lr": 0.1}})])
hooks.on_train_start(state)
for step in range(1, 6):
    state.step, state.tokens = step, step * 64
    hooks.on_log(state, {{"loss": torch.tensor(10.0 / step), "lr": 0.1 * step, "step_time_s": 0.5, "tokens": 64}})
    if step == 4:
        hooks.on_eval(state, {{"val_loss": 1.25, "val_ppl": 3.49}})
hooks.on_train_end(state)
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1]),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DISABLE_GIT": "true",
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = find_offline_runs(run_dir)
    assert len(runs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert runs[0].name == f"run-{run_id}.wandb"
    rows = read_wandb_history(runs[0])
    train = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["train/loss"] for r in train] == pytest.approx([10.0, 5.0, 10 / 3, 2.5, 2.0])
    assert [r["train/lr"] for r in train] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert train[0]["train/tokens_per_s"] == pytest.approx(128.0) and train[0]["train/mfu"] == pytest.approx(1.28e-4)
    evals = [r for r in rows if "eval/val_loss" in r]
    assert len(evals) == 1 and evals[0]["eval/val_loss"] == 1.25 and evals[0]["_step"] == 4


def test_wandb_logger_rejects_unknown_mode():
    with pytest.raises(ValueError, match="offline, online or disabled"):
        WandbLogger(mode="cloud")
