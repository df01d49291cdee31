"""`kiln plot RUN_DIR`: loss and throughput curves from a run's ``metrics.jsonl`` to a PNG.

Panels: training loss (and validation loss when the run evaluated) against step; tokens/s against step; and,
when the run logged them, learning rate and MFU. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from kiln.pretrain.callbacks.metrics_file import METRICS_FILE, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves to ``out`` (default ``<run_dir>/metrics.png``); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir if run_dir.is_file() else run_dir / METRICS_FILE
    data = read_metrics(metrics_path)
    train, evals = data["train"], data["eval"]
    if not train and not evals:
        raise ValueError(f"{metrics_path} holds no metrics records")
    panels = [("loss", "loss"), ("tokens_per_s", "tokens/s")]
    for key, title in (("lr", "learning rate"), ("mfu", "MFU")):
        if _series(train, key)[0]:
            panels.append((key, title))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        xs, ys = _series(train, key)
        if xs:
            ax.plot(xs, ys, label=f"train {title}" if key == "loss" else title, linewidth=1.2)
        if key == "loss":
            vx, vy = _series(evals, "val_loss")
            if vx:
                ax.plot(vx, vy, "o-", label="validation loss", linewidth=1.2, markersize=4)
            ax.legend(loc="upper right")
        if key == "mfu":
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{run_dir.name if run_dir.is_dir() else run_dir.parent.name}")
    fig.tight_layout()
    out = Path(out) if out is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cmd_plot(args) -> int:
    from kiln.config import ConfigError

    try:
        out = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {out}")
    return 0


def register_plot(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw loss and throughput curves of a training run to a PNG",
        description="Read RUN_DIR/metrics.jsonl (written by the trainer) and draw training/validation loss, "
        "tokens/s, and (when logged) learning rate and MFU against step.",
        epilog="example:\n  kiln plot runs/pretrain-tiny --out loss.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl (or the metrics file itself)")
    p.add_argument("--out", help="output PNG (default RUN_DIR/metrics.png)")
    p.set_defaults(func=cmd_plot)
