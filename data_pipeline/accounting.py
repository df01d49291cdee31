"""Per-reason accounting of a curation run, built from datatrove's own per-task stats files.

Every step counts what it does with `stat_update` (datatrove's mechanism, so the numbers are the ones
datatrove users already know): readers count `documents` and `rejected_<reason>`, filters and dedup count
`dropped_<reason>`. A step that replaces one document by several (decontamination's `split` policy) counts
`documents_split` (documents replaced) and `pieces_created` (documents made). The report checks that the books
balance:

    input records + pieces_created - documents_split = kept + sum(dropped by step and reason) + rejected
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kiln.data_pipeline.decontaminate.summary import load_summary

INPUT_STAGE = "read_filter"
# Stages whose last step writes output/ (the kept documents); tokenize stages come after and count nothing new.
CURATION_STAGES = ("read_filter", "dedup_filter")


@dataclass
class StepCounts:
    stage: str
    name: str
    counts: dict[str, float]


@dataclass
class Report:
    run_dir: str
    input_records: int
    documents_read: int
    kept: int
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> reason -> count
    steps: list[StepCounts] = field(default_factory=list)
    incomplete_stages: list[str] = field(default_factory=list)
    documents_split: int = 0  # documents replaced by pieces (decontamination, policy split)
    pieces_created: int = 0  # the pieces: documents that enter the books after the input
    decontamination: dict | None = None  # per eval set overlap counts (decontaminate.summary), if the run has it

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def total_dropped(self) -> int:
        return sum(sum(r.values()) for r in self.dropped.values())

    @property
    def balanced(self) -> bool:
        produced = self.input_records + self.pieces_created - self.documents_split
        return produced == self.kept + self.total_dropped + self.total_rejected

    def to_dict(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "input_records": self.input_records,
            "documents_read": self.documents_read,
            "kept": self.kept,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "total_dropped": self.total_dropped,
            "total_rejected": self.total_rejected,
            "documents_split": self.documents_split,
            "pieces_created": self.pieces_created,
            "balanced": self.balanced,
            "incomplete_stages": self.incomplete_stages,
        }


def _total(value) -> float:
    return value.get("total", 0) if isinstance(value, dict) else value


def _clean_name(name: str) -> str:
    """datatrove step names carry emoji and a type prefix ('🔻 - FILTER: 👯 Gopher'); keep the readable part."""
    name = name.split(":", 1)[-1]
    return re.sub(r"[^\w .()/+-]", "", name).strip() or name


def load_stage_stats(stage_dir: Path) -> tuple[list[StepCounts], int]:
    """Sum the per-task stats files of one stage; returns (steps, number of task files found)."""
    files = sorted((stage_dir / "stats").glob("*.json"))
    merged: dict[int, StepCounts] = {}
    for path in files:
        for i, step in enumerate(json.loads(path.read_text())):
            entry = merged.setdefault(i, StepCounts(stage_dir.name, _clean_name(step["name"]), defaultdict(float)))
            for key, value in step.get("stats", {}).items():
                entry.counts[key] += _total(value)
    return [merged[i] for i in sorted(merged)], len(files)


def _stage_order(logs: Path) -> list[Path]:
    def key(p: Path):
        order = {"read_filter": (0, 0), "dedup_filter": (2, 0), "tokenize": (3, 0), "tokenize_merge": (3, 1)}
        if p.name.startswith("dedup_") and p.name[6:].isdigit():
            return (1, int(p.name[6:]))
        return order.get(p.name, (4, 0))

    return sorted((p for p in logs.iterdir() if p.is_dir() and p.name != "slurm"), key=key)


def build_report(run_dir: str | Path) -> Report:
    run_dir = Path(run_dir)
    logs = run_dir / "logs"
    if not logs.is_dir():
        raise FileNotFoundError(f"{run_dir}: no logs/ folder; is this the output_dir of a `kiln data run`?")
    steps: list[StepCounts] = []
    incomplete: list[str] = []
    for stage_dir in _stage_order(logs):
        stage_steps, n_files = load_stage_stats(stage_dir)
        executor = stage_dir / "executor.json"
        expected = json.loads(executor.read_text()).get("world_size", n_files) if executor.exists() else n_files
        if n_files < expected:
            incomplete.append(f"{stage_dir.name} ({n_files}/{expected} tasks)")
        steps += stage_steps

    documents_read = documents_split = pieces_created = 0
    rejected: dict[str, int] = defaultdict(int)
    dropped: dict[str, dict[str, int]] = {}
    for step in steps:
        if step.stage not in CURATION_STAGES and not step.stage.startswith("dedup_"):
            continue  # e.g. tokenize: reads the kept output again, drops nothing
        c = step.counts
        documents_split += int(c.get("documents_split", 0))
        pieces_created += int(c.get("pieces_created", 0))
        if step.stage == INPUT_STAGE and "documents" in c:
            # a reader's input is what it yielded plus what it dropped itself (e.g. WARC pages without text)
            documents_read += int(c["documents"]) + int(c.get("dropped", 0))
        for key, value in c.items():
            if key.startswith("rejected_"):
                rejected[key[len("rejected_") :]] += int(value)
        reasons = {k[len("dropped_") :]: int(v) for k, v in c.items() if k.startswith("dropped_")}
        unexplained = int(c.get("dropped", 0)) - sum(reasons.values())
        if unexplained > 0:
            reasons["unspecified"] = unexplained
        if reasons:
            label = step.name if step.name not in dropped else f"{step.name} [{step.stage}]"
            dropped[label] = reasons
    curation = [s.stage for s in steps if s.stage in CURATION_STAGES]
    output_steps = [s for s in steps if curation and s.stage == curation[-1]]
    kept = int(output_steps[-1].counts.get("total", 0)) if output_steps else 0
    return Report(
        run_dir=str(run_dir),
        input_records=documents_read + sum(rejected.values()),
        documents_read=documents_read,
        kept=kept,
        rejected=dict(rejected),
        dropped=dropped,
        steps=steps,
        incomplete_stages=incomplete,
        documents_split=documents_split,
        pieces_created=pieces_created,
        decontamination=load_summary(run_dir),
    )
