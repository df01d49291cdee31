"""Throughput metrics (tokens/s, TFLOP/s per device, MFU, ETA) and the console line."""

from __future__ import annotations

import math
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
    """Adds ``tokens_per_s``, ``tflops_per_device`` and ``mfu`` to the interval metrics of ``on_log``.

    The rates are those of the whole interval (``interval_tokens`` over ``steps x step_time_s``, see
    ``kiln.pretrain.metrics``), so on a GPU they count device time, not how fast the host queued the kernels.
    Runs before the loggers (priority 40).

    Args:
        flops_per_token: training FLOPs per token (`flops.flops_per_token`); None leaves FLOP metrics out.
        peak_flops: peak FLOP/s of one device (`flops.peak_flops_per_device`); None leaves MFU out.
        num_devices: devices the FLOPs are spread over (default: ``state.world_size``).
    """

    priority = 40

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None, num_devices=None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_devices = num_devices

    def on_log(self, state: TrainState, metrics: dict[str, Any]) -> None:
        steps = max(1, int(metrics.get("steps", 1)))
        seconds = float(metrics.get("step_time_s", 0.0)) * steps
        tokens = metrics.get("interval_tokens", float(metrics.get("tokens", 0)) * steps)
        if seconds <= 0 or not tokens:
            return
        metrics["tokens_per_s"] = float(tokens) / seconds
        if self.flops_per_token is not None:
            per_device = metrics["tokens_per_s"] * self.flops_per_token / (self.num_devices or state.world_size)
            metrics["tflops_per_device"] = per_device / 1e12
            if self.peak_flops:
                metrics["mfu"] = per_device / self.peak_flops


class ConsoleLogger(Callback):
    """One line per log step on the main rank: step, loss (mean over the interval's non-skipped steps), lr, grad
    norm, tokens/s, TFLOP/s per device, MFU, ETA, skipped steps; and one line per evaluation."""

    def __init__(self, print_fn: Callable[[str], None] | None = None):
        self.print_fn = print_fn or (lambda line: print(line, flush=True))
        self.lines: list[str] = []

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        self.print_fn(line)

    def on_log(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if state.is_main:
            self._emit(self.format(state, metrics))

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        loss_key = next((k for k in metrics if k.startswith("val") and k.endswith("_loss")), None)
        if not state.is_main or loss_key is None:
            return
        prefix = loss_key[: -len("_loss")]  # val, or val_<source> for one of several held-out splits
        line = f"eval step {state.step} | {loss_key} {float(metrics[loss_key]):.4f}"
        if f"{prefix}_ppl" in metrics:
            line += f" | {prefix}_ppl {float(metrics[prefix + '_ppl']):.3f}"
        if f"{prefix}_tokens" in metrics:
            line += f" | tokens {int(metrics[prefix + '_tokens']):,}"
        self._emit(line)

    @staticmethod
    def format(state: TrainState, metrics: dict[str, Any]) -> str:
        total = f"/{state.total_steps}" if state.total_steps else ""
        parts = [f"step {state.step}{total}", f"loss {float(metrics.get('loss', math.nan)):.4f}"]
        if "lr" in metrics:
            parts.append(f"lr {float(metrics['lr']):.3e}")
        if "grad_norm" in metrics:
            parts.append(f"grad_norm {float(metrics['grad_norm']):.3f}")
        if "tokens_per_s" in metrics:
            parts.append(f"tokens/s {metrics['tokens_per_s']:,.0f}")
        if "tflops_per_device" in metrics:
            parts.append(f"TFLOP/s/dev {metrics['tflops_per_device']:.2f}")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        if state.total_steps and "step_time_s" in metrics:
            parts.append(f"ETA {format_duration((state.total_steps - state.step) * float(metrics['step_time_s']))}")
        if metrics.get("skipped"):
            parts.append(f"skipped {int(metrics['skipped'])}")
        return " | ".join(parts)
