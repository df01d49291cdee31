"""What an SFT build says about itself: the per-reason drop log, a rendered sample with its loss mask, and the
console summary. report.json itself is assembled by `build` (it knows the numbers); its keys are listed in
data_pipeline/CONTRACTS.md.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NO_LOSS_OPEN, NO_LOSS_CLOSE = "⟦", "⟧"  # as `kiln data inspect` marks tokens without loss
EXAMPLES_PER_REASON = 20


@dataclass
class DropLog:
    """Every set-aside row: counted by reason, the first few per reason kept for report.json, all of them
    written to dropped.jsonl (source, file, record index, reason, detail)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def add(self, reason: str, source: str, file: str, record: int | None, detail: str = "") -> None:
        row = {"reason": reason, "source": source, "file": file, "record": record, "detail": detail}
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(row)
        self.rows.append(row)

    def by_source(self, source: str) -> dict[str, int]:
        return dict(sorted(Counter(r["reason"] for r in self.rows if r["source"] == source).items()))

    def summary(self) -> dict:
        return {
            "total": sum(self.counts.values()),
            "by_reason": dict(sorted(self.counts.items())),
            "examples": {k: self.examples[k] for k in sorted(self.examples)},
        }

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def render_masked(ids: np.ndarray, mask: np.ndarray, tokenizer) -> str:
    """Decoded tokens with every run of no-loss tokens wrapped in ⟦...⟧ (runs are decoded whole, so multi-byte
    characters come out intact; special tokens are shown by name)."""
    out: list[str] = []
    start = 0
    for end in [*np.flatnonzero(np.diff(mask.astype(np.int8))) + 1, mask.size]:
        text = tokenizer.decode(ids[start:end])
        out.append(text if mask[start] else f"{NO_LOSS_OPEN}{text}{NO_LOSS_CLOSE}")
        start = end
    return "".join(out)


class Progress:
    """One console line per phase, rewritten in place on a terminal; a final line either way."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self.tty and now - self._last > 0.2:
            self.stream.write(f"\r  {text:<70} {now - self._start:6.1f} s")
            self.stream.flush()
            self._last = now

    def done(self, text: str) -> None:
        if self.enabled:
            prefix = "\r" if self.tty else ""
            self.stream.write(f"{prefix}  {text:<70} {time.monotonic() - self._start:6.1f} s\n")
            self.stream.flush()


def summary_lines(report: dict) -> list[str]:
    """The end-of-build summary: per source, then the mix and packing."""
    rows = [("source", "role", "input", "kept", "dropped", "train ex.", "epochs", "target", "realised")]
    for name, s in report["sources"].items():
        rows.append(
            (
                name,
                s["role"],
                str(s["input"]),
                str(s["kept"]),
                str(s["dropped"]),
                str(s["examples"]),
                f"{s['epochs']:.2f}",
                f"{s['target_share']:.3f}",
                f"{s['realised_share']:.3f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    mix, pack = report["mix"], report["packing"]
    lines.insert(1, "-" * len(lines[0]))
    lines += [
        "",
        f"input {report['input']}  kept {report['kept']}  dropped {report['dropped']['total']}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in report['dropped']['by_reason'].items())})"
            if report["dropped"]["total"]
            else ""
        )
        + f"  truncated {report['truncated']}",
        f"agent share {report['agent_share']:.4f} by {mix['by']} (target {mix['eta']}); "
        f"{mix['examples']} examples, {mix['tokens']} tokens, {mix['trainable_tokens']} trainable"
        + (f"; stopped early: {mix['limited_by']} reached max_repeats" if mix["limited_by"] else ""),
        f"packing: {pack['packs']} sequences of {pack['pack_tokens']} tokens, efficiency {pack['efficiency']:.4f}",
        f"output: {report['outputs']['train']}  (report.json, dropped.jsonl, sample.txt, tokenizer/ beside it)",
    ]
    return lines
