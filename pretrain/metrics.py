"""Training metrics between two log lines, kept on the device until the log step.

Reading a CUDA tensor on the host (``float(loss)``, ``.item()``, ``.cpu()``) waits for every kernel queued so
far, which stalls the stream the next step's kernels would fill. So the trainer adds each step's loss to a
device tensor and reads everything once per ``log_interval`` steps, in one transfer. What loggers then get
(``on_log``) summarises the interval:

* ``loss``: mean over the interval's steps that were not skipped (NaN when all were);
* ``grad_norm``, ``lr``, ``global_batch``, ``tokens``: the last step's;
* ``interval_tokens``, ``steps``, ``skipped``: totals over the interval; ``step_time_s``: mean wall seconds per step,
  from the end of the previous step's callbacks to the end of the step's ``train_batch`` (waiting for data
  included; evaluations and checkpoint saves, which run in callbacks, left out). On a GPU the kernels a step
  queued finish during the next one, so a single step's time is off, but an interval's sum is right: the
  summary itself waits for the device.

With ``log_interval=1`` these are the step's own values.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch


class IntervalMetrics:
    """Accumulates per-step metrics (device tensors or numbers) and summarises them at a log step."""

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._loss_sum: torch.Tensor | float = 0.0
        self._counted = 0
        self._steps = 0
        self._skipped = 0
        self._tokens = 0
        self._seconds = 0.0
        self._last: dict[str, Any] = {}

    def restart_clock(self) -> None:
        """The next step starts now (call it after the callbacks of a step)."""
        self._since = time.perf_counter()

    def add(self, metrics: dict[str, Any], tokens: int) -> None:
        """One step's metrics, right after its ``train_batch``. ``metrics["skip"]`` (a host bool, set by the
        train module) keeps the step's loss out of the mean."""
        self._seconds += time.perf_counter() - self._since
        self._steps += 1
        self._tokens += tokens
        if metrics.get("skip"):
            self._skipped += 1
        elif "loss" in metrics:
            loss = metrics["loss"]
            self._loss_sum = self._loss_sum + (loss.detach().double() if torch.is_tensor(loss) else float(loss))
            self._counted += 1
        self._last = metrics

    def summary(self) -> dict[str, Any]:
        """The interval's metrics as host numbers (one device-to-host copy), and start the next interval."""
        device_values = {"loss_sum": self._loss_sum}
        grad_norm = self._last.get("grad_norm")
        if grad_norm is not None:
            device_values["grad_norm"] = grad_norm
        host = _to_host(device_values)
        out: dict[str, Any] = {k: v for k, v in self._last.items() if k not in ("loss", "grad_norm", "skip")}
        out["loss"] = host["loss_sum"] / self._counted if self._counted else math.nan
        if "grad_norm" in host:
            out["grad_norm"] = host["grad_norm"]
        steps = max(1, self._steps)
        out.update(
            steps=self._steps, skipped=self._skipped, interval_tokens=self._tokens, step_time_s=self._seconds / steps
        )
        if self._skipped:
            out["skip"] = True
        self._reset()
        return out


def _to_host(values: dict[str, Any]) -> dict[str, float]:
    """Floats of a dict of 0-dim tensors and numbers, with one transfer for the tensors."""
    tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    if tensors:
        device = next(iter(tensors.values())).device
        parts = [t.detach().double().reshape(()).to(device) for t in tensors.values()]
        stacked = torch.stack(parts).cpu().tolist()
        out.update(zip(tensors, stacked))
    return out


__all__ = ["IntervalMetrics"]
