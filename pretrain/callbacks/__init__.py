"""Train-loop callbacks: throughput/console logging, the metrics file, W&B, NaN guard.

A typical list, in this order (the loggers read what `Throughput` and `NanGuard` add to the metrics)::

    [NanGuard(max_nan_steps), Throughput(flops_per_token(cfg, seq), peak_flops_per_device("bfloat16")),
     ConsoleLogger(log_interval), MetricsFile(run_dir), WandbLogger(run_dir, mode="offline"),
     Evaluator(loss_fn, batches, eval_interval, sink=callback_list)]
"""

from kiln.pretrain.callbacks.base import Callback, CallbackList, TrainState
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
