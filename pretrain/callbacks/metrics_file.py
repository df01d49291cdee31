"""Metrics as JSON lines in the run directory (``metrics.jsonl``), the file `kiln plot` reads.

One object per line: ``{"kind": "train", "step": 10, "time": <unix s>, "loss": ..., "lr": ..., ...}`` for
training steps and ``{"kind": "eval", "step": 10, "val_loss": ..., "val_ppl": ...}`` for evaluations. Only
numbers and booleans are kept (non-finite floats are written as null, so every line is strict JSON). A resumed
run appends; readers keep the last record of each (kind, step).
"""

from __future__ import annotations

import json
import math
import numbers
import time
from pathlib import Path
from typing import Any

from kiln.pretrain.callbacks.base import Callback, TrainState

METRICS_FILE = "metrics.jsonl"


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if isinstance(v, bool):
            out[k] = v
        elif isinstance(v, numbers.Real):
            v = float(v) if not isinstance(v, numbers.Integral) else int(v)
            out[k] = v if not isinstance(v, float) or math.isfinite(v) else None
    return out


class MetricsFile(Callback):
    """Append train metrics (at every log step: ``on_log``'s interval summary) and eval metrics to
    ``<run_dir>/metrics.jsonl`` on the main rank."""

    def __init__(self, run_dir: str | Path | None = None, filename: str = METRICS_FILE):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.filename = filename
        self._file = None

    @property
    def path(self) -> Path:
        if self.run_dir is None:
            raise ValueError("MetricsFile needs a run_dir (argument or state.run_dir)")
        return self.run_dir / self.filename

    def _write(self, state: TrainState, kind: str, metrics: dict[str, Any]) -> None:
        if not state.is_main:
            return
        if self.run_dir is None:
            self.run_dir = state.run_dir
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        record = {"kind": kind, "step": state.step, "time": time.time(), **_clean(metrics)}
        record.setdefault("tokens_total", state.tokens)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_start(self, state: TrainState) -> None:
        if self.run_dir is None:
            self.run_dir = state.run_dir

    def on_log(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self._write(state, "train", metrics)

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self._write(state, "eval", metrics)

    def on_train_end(self, state: TrainState) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``metrics.jsonl`` (or a run directory holding one) -> {"train": [...], "eval": [...]}, each sorted by
    step, keeping the last record of a step (a resumed run rewrites the steps after its checkpoint)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no metrics were written to this run directory")
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            by_kind.setdefault(rec.get("kind", "train"), {})[int(rec.get("step", n))] = rec
    return {kind: [recs[s] for s in sorted(recs)] for kind, recs in by_kind.items()} | {
        k: [] for k in ("train", "eval") if k not in by_kind
    }
