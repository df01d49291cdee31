"""The decontamination report: per-task overlap records merged into ``<run>/report/decontamination.json``.

Each task of the step writes ``<run>/work/decontaminate/overlap/<rank:05d>.json`` when it has seen all its
documents: per eval set, how many of the task's training documents overlapped it and which eval items did. The
merge sums the document counts and unions the item indices, so the eval-item counts are exact across tasks.
``decontamination.json``::

    {"ngram": 13, "policy": "split", "tasks": 4, "tasks_reported": 4,
     "documents_checked": 2000, "contaminated_documents": 12,
     "eval_sets": {"mmlu": {"path": ..., "items": 1000, "items_too_short": 3, "indexed_items": 997, "ngrams": ...,
                            "contaminated_documents": 9,      # training documents with >= 1 n-gram of this set
                            "contaminated_items": 4,          # eval items with >= 1 n-gram in the training data
                            "clean_items": 993,               # indexed items with none
                            "contaminated_item_indices": [..]}}}

A training document overlapping several sets counts once per set (and once in ``contaminated_documents``). Items
too short to hold an n-gram are neither clean nor contaminated: they were not checked. Imports no datatrove.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_NAME = "decontamination.json"
_SET_FIELDS = ("path", "text_key", "format", "items", "items_too_short", "indexed_items", "ngrams")


def run_work_dir(run_dir: str | Path) -> Path:
    """Where the step of a `kiln data run` keeps its index cache and per-task overlap records."""
    return Path(run_dir) / "work" / "decontaminate"


def overlap_path(work_dir: str | Path, rank: int) -> Path:
    return Path(work_dir) / "overlap" / f"{rank:05d}.json"


def merge_overlap(records: list[dict]) -> dict:
    """Merge per-task records (see ``DecontaminateStep``) into the report's summary."""
    first = records[0]
    sets: dict[str, dict] = {}
    indices: dict[str, set[int]] = {}
    for record in records:
        for s in record["sets"]:
            entry = sets.setdefault(s["name"], {k: s[k] for k in _SET_FIELDS} | {"contaminated_documents": 0})
            entry["contaminated_documents"] += s["contaminated_documents"]
            indices.setdefault(s["name"], set()).update(s["contaminated_items"])
    for name, entry in sets.items():
        dirty = sorted(indices[name])
        entry["contaminated_items"] = len(dirty)
        entry["clean_items"] = entry["indexed_items"] - len(dirty)
        entry["contaminated_item_indices"] = dirty
    return {
        "ngram": first["ngram"],
        "policy": first["policy"],
        "normalisation": first.get("normalisation"),
        "tasks": first.get("world_size"),
        "tasks_reported": len(records),
        "documents_checked": sum(r["documents_checked"] for r in records),
        "contaminated_documents": sum(r["contaminated_documents"] for r in records),
        "eval_sets": sets,
    }


def load_summary(run_dir: str | Path) -> dict | None:
    """The merged summary of a run's decontamination step, or None if the run has none."""
    files = sorted((run_work_dir(run_dir) / "overlap").glob("*.json"))
    if not files:
        return None
    return merge_overlap([json.loads(p.read_text()) for p in files])


def summary_lines(summary: dict) -> list[str]:
    """A header and one line per eval set, for the `kiln data stats` table (short: rich wraps long captions)."""
    lines = [f"decontamination ({summary['ngram']}-grams, {summary['policy']}), details in {REPORT_NAME}:"]
    for name, s in summary["eval_sets"].items():
        short = f" ({s['items_too_short']:,} too short)" if s["items_too_short"] else ""
        lines.append(
            f"{name}: {s['contaminated_documents']:,} documents overlap {s['contaminated_items']:,}"
            f" of {s['items']:,} items{short}"
        )
    return lines


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return path
