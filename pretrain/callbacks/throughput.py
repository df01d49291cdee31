"""Throughput metrics (tokens/s, TFLOP/s per device, MFU, ETA) and the console line."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from kiln.pretrain.callbacks.base import Callback, TrainState


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"


class Throughput(Callback):
    """Adds per-step ``step_time_s``, ``tokens_per_s``, ``tflops_per_device`` and ``mfu`` to the metrics.

    Put it before the loggers. Step time comes from ``metrics["step_time_s"]`` when the loop measured it, else
    from the wall clock between hooks; tokens from ``metrics["tokens"]`` or the change of ``state.tokens``.

    Args:
        flops_per_token: training FLOPs per token (`flops.flops_per_token`); None leaves FLOP metrics out.
        peak_flops: peak FLOP/s of one device (`flops.peak_flops_per_device`); None leaves MFU out.
        num_devices: devices the FLOPs are spread over (default: ``state.world_size``).
    """

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None, num_devices=None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_devices = num_devices
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_start(self, state: TrainState) -> None:
        self._last_time = time.perf_counter()
        self._last_tokens = state.tokens

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._last_time is None:
            self._last_time, self._last_tokens = now, state.tokens - metrics.get("tokens", 0)
        tokens = metrics.get("tokens", state.tokens - self._last_tokens)
        seconds = metrics.get("step_time_s", now - self._last_time)
        self._last_time, self._last_tokens = now, state.tokens
        metrics.setdefault("tokens", tokens)
        metrics.setdefault("step_time_s", seconds)
        if seconds > 0:
            metrics.setdefault("tokens_per_s", tokens / seconds)
        if self.flops_per_token is not None and "tokens_per_s" in metrics:
            devices = self.num_devices or state.world_size
            per_device = metrics["tokens_per_s"] * self.flops_per_token / devices
            metrics["tflops_per_device"] = per_device / 1e12
            if self.peak_flops:
                metrics["mfu"] = per_device / self.peak_flops


class ConsoleLogger(Callback):
    """One line per ``log_interval`` steps on the main rank: step, loss, lr, grad norm, tokens/s, TFLOP/s per
    device, MFU, ETA. Rates are averaged over the interval (total tokens / total step time); the loss is the
    mean over the interval's non-skipped steps. Needs `Throughput` earlier in the callback list for the rates."""

    def __init__(self, log_interval: int = 10, print_fn: Callable[[str], None] | None = None):
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self.log_interval = log_interval
        self.print_fn = print_fn or (lambda line: print(line, flush=True))
        self._reset()
        self.lines: list[str] = []

    def _reset(self) -> None:
        self._losses: list[float] = []
        self._tokens = 0.0
        self._seconds = 0.0
        self._flops_s = 0.0
        self._mfu_s = 0.0
        self._skipped = 0

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        seconds = float(metrics.get("step_time_s", 0.0))
        self._seconds += seconds
        self._tokens += float(metrics.get("tokens", 0.0))
        self._flops_s += float(metrics.get("tflops_per_device", 0.0)) * seconds
        self._mfu_s += float(metrics.get("mfu", 0.0)) * seconds
        loss = metrics.get("loss")
        if metrics.get("skip") or loss is None or not math.isfinite(float(loss)):
            self._skipped += 1
        else:
            self._losses.append(float(loss))
        if state.step % self.log_interval and state.step != state.total_steps:
            return
        if state.is_main:
            line = self.format(state, metrics)
            self.lines.append(line)
            self.print_fn(line)
        self._reset()

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if not state.is_main or "val_loss" not in metrics:
            return
        line = f"eval step {state.step} | val_loss {float(metrics['val_loss']):.4f}"
        if "val_ppl" in metrics:
            line += f" | val_ppl {float(metrics['val_ppl']):.3f}"
        if "val_tokens" in metrics:
            line += f" | tokens {int(metrics['val_tokens']):,}"
        self.lines.append(line)
        self.print_fn(line)

    def format(self, state: TrainState, metrics: dict[str, Any]) -> str:
        total = f"/{state.total_steps}" if state.total_steps else ""
        parts = [f"step {state.step}{total}"]
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        parts.append(f"loss {loss:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {float(metrics['lr']):.3e}")
        if "grad_norm" in metrics:
            parts.append(f"grad_norm {float(metrics['grad_norm']):.3f}")
        if self._seconds > 0:
            parts.append(f"tokens/s {self._tokens / self._seconds:,.0f}")
            if "tflops_per_device" in metrics:
                parts.append(f"TFLOP/s/dev {self._flops_s / self._seconds:.2f}")
            if "mfu" in metrics:
                parts.append(f"MFU {100 * self._mfu_s / self._seconds:.1f}%")
            steps = max(1, len(self._losses) + self._skipped)
            if state.total_steps:
                eta = (state.total_steps - state.step) * self._seconds / steps
                parts.append(f"ETA {format_duration(eta)}")
        if self._skipped:
            parts.append(f"skipped {self._skipped}")
        return " | ".join(parts)
