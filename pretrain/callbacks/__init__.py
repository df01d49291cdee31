"""Trainer callbacks: NaN guard, checkpointer, throughput, console line, metrics file, W&B (the evaluator is
``kiln.pretrain.callbacks.evaluation.EngineEvaluator``).

``kiln.pretrain.train.default_callbacks`` builds the usual list; each callback's ``priority`` fixes the order
the trainer runs them in (``kiln.pretrain.callbacks.base``), whatever order they are given in::

    [NanGuard(max_nan_steps), Checkpointer(manager, interval), Throughput(flops_per_token(cfg, seq), peak),
     ConsoleLogger(), MetricsFile(run_dir), WandbLogger(run_dir, mode="offline")]
"""

from kiln.pretrain.callbacks.base import Callback, CallbackList, TrainState
from kiln.pretrain.callbacks.checkpointer import Checkpointer
from kiln.pretrain.callbacks.flops import PEAK_FLOPS, flops_per_token, measure_cpu_peak_flops, peak_flops_per_device
from kiln.pretrain.callbacks.metrics_file import METRICS_FILE, MetricsFile, read_metrics
from kiln.pretrain.callbacks.nan_guard import NanGuard
from kiln.pretrain.callbacks.throughput import ConsoleLogger, Throughput, format_duration
from kiln.pretrain.callbacks.wandb_logger import WandbLogger, find_offline_runs, read_wandb_history

__all__ = [
    "METRICS_FILE",
    "PEAK_FLOPS",
    "Callback",
    "CallbackList",
    "Checkpointer",
    "ConsoleLogger",
    "MetricsFile",
    "NanGuard",
    "Throughput",
    "TrainState",
    "WandbLogger",
    "find_offline_runs",
    "flops_per_token",
    "format_duration",
    "measure_cpu_peak_flops",
    "peak_flops_per_device",
    "read_metrics",
    "read_wandb_history",
]
