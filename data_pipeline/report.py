"""`kiln data stats`: the accounting report as a terminal table, a PNG chart, an HTML page and JSON."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from kiln.data_pipeline.accounting import Report
from kiln.data_pipeline.decontaminate.summary import summary_lines, write_summary


def build_table(report: Report):
    """The report as a rich Table (printed with colour on a terminal; exported as text for files)."""
    from rich.table import Table

    table = Table(title=f"kiln data stats: {report.run_dir}", show_lines=False)
    table.add_column("step")
    table.add_column("reason")
    table.add_column("documents", justify="right")
    table.add_column("% of input", justify="right")

    def pct(n: int) -> str:
        return f"{100 * n / report.input_records:.1f}%" if report.input_records else "-"

    table.add_row("input", "records read", f"{report.input_records:,}", pct(report.input_records), style="bold")
    if report.documents_split or report.pieces_created:  # decontamination's split policy: 1 document -> N pieces
        table.add_row("split (decontamination)", "documents split", f"-{report.documents_split:,}", "")
        table.add_row("split (decontamination)", "pieces created", f"+{report.pieces_created:,}", "")
    for reason, n in sorted(report.rejected.items(), key=lambda kv: -kv[1]):
        table.add_row("rejected (malformed input)", reason, f"{n:,}", pct(n), style="red")
    for step, reasons in report.dropped.items():
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            table.add_row(step, reason, f"{n:,}", pct(n))
    table.add_row("kept", "", f"{report.kept:,}", pct(report.kept), style="bold green")
    check = "balanced" if report.balanced else "DOES NOT BALANCE"
    split = ""
    if report.documents_split or report.pieces_created:
        split = f" + pieces {report.pieces_created:,} - split {report.documents_split:,}"
    table.caption = (
        f"input {report.input_records:,}{split} = kept {report.kept:,} + dropped {report.total_dropped:,}"
        f" + rejected {report.total_rejected:,}: {check}"
    )
    if report.decontamination:
        table.caption += "\n" + "\n".join(summary_lines(report.decontamination))
    if report.incomplete_stages:
        table.caption += f"\nincomplete stages (re-run to resume): {', '.join(report.incomplete_stages)}"
    return table


def render_table(report: Report) -> str:
    from rich.console import Console

    console = Console(width=110, record=True, file=io.StringIO())
    console.print(build_table(report))
    return console.export_text()


def write_png(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = ["kept"], [report.kept], ["#2e7d32"]
    for reason, n in report.rejected.items():
        labels.append(f"rejected: {reason}")
        values.append(n)
        colors.append("#c62828")
    for step, reasons in report.dropped.items():
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            labels.append(f"{step}: {reason}")
            values.append(n)
            colors.append("#ef6c00")
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.5))
    y = range(len(labels))[::-1]
    ax.barh(list(y), values, color=colors)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("documents")
    run = Path(report.run_dir)
    ax.set_title(f"{run.parent.name}/{run.name}: {report.input_records:,} input records", fontsize=10)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,}", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html(report: Report, table_text: str, png: Path, path: Path) -> Path:
    image = base64.b64encode(png.read_bytes()).decode()
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>kiln data stats</title>"
        "<body style='font-family:sans-serif;max-width:60em;margin:2em auto'>"
        f"<h1>kiln data stats</h1><p>{html.escape(report.run_dir)}</p>"
        f"<img alt='documents by outcome' src='data:image/png;base64,{image}'>"
        f"<pre>{html.escape(table_text)}</pre></body>"
    )
    return path


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = render_table(report)
    (out_dir / "stats.txt").write_text(table)
    (out_dir / "stats.json").write_text(json.dumps(report.to_dict(), indent=2))
    png = write_png(report, out_dir / "stats.png")
    page = write_html(report, table, png, out_dir / "stats.html")
    files = {"table": out_dir / "stats.txt", "json": out_dir / "stats.json", "png": png, "html": page}
    if report.decontamination:  # per eval set overlap counts and the contaminated item indices
        files["decontamination"] = write_summary(report.decontamination, out_dir)
    return files
