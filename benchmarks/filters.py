"""Quality filters: Kiln's heuristic filters vs datatrove's stock ones, same documents, one process, per-core speed.

Both sides run the four heuristic rule sets of the web recipe (recipes/data/web.yaml) in its order: Gopher
repetition -> Gopher quality -> C4 -> FineWeb, default configs, built by ``build_filter`` with
``implementation: datatrove`` (datatrove's ``GopherRepetitionFilter``, ``GopherQualityFilter``, ``C4QualityFilter``,
``FineWebQualityFilter``) or ``implementation: kiln`` (data_pipeline/filters/heuristics.py). Each document goes
through the chain as datatrove pipeline steps (``run``), so C4's edited text is what FineWeb sees.

- **Chain** (the ratio): ``--rounds`` rounds; in each, both sides filter every document, in alternating order, so
  that machine load hits both alike. Time is the process CPU time (``time.process_time``) of the filtering only:
  documents are built before, spaCy is imported and datatrove's tokenizer loaded before the first round, and our
  word splitter is reset (a fresh spaCy tokenizer, empty caches) before each of our runs, which counts its
  warm-up against us.
- **Per filter**: once, each filter alone on every document (datatrove then ours), CPU seconds per filter.
- **Decisions**: for every document and round, where it was dropped (which filter, which reason) or that it was
  kept, and its final text (C4 removes lines), must be identical on both sides, else the benchmark fails. The
  per-filter pass checks each filter's decision, reason and text on every document too.
- **Process start**: CPU seconds for a fresh Python process to build the four filters and filter one document
  (imports and tokenizer loading; whether torch got imported), for each side.

Input: the shared web pages (``wceb_modern_1000_url_text.jsonl``, 1000 pages) and the C4 demo (300 documents).

Usage (from the repository root):

    python -m benchmarks.filters                      # all 1300 documents, 3 rounds
    python -m benchmarks.filters --max-docs 200 --rounds 2 --no-record

Results are appended to benchmarks/results/filters.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.record import append_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "filters.md"
SHARED = Path(os.environ.get("KILN_SHARED_DATA", REPO.parent / "shared" / "data"))
INPUTS = [SHARED / "web" / "wceb_modern_1000_url_text.jsonl", SHARED / "web" / "llamafactory_c4_demo.jsonl"]
SIDES = ("datatrove", "kiln")
GOAL = 3.0


def recipe_configs():
    from kiln.data_pipeline.filters import (
        C4QualityConfig,
        FineWebQualityConfig,
        GopherQualityConfig,
        GopherRepetitionConfig,
    )

    return [GopherRepetitionConfig(), GopherQualityConfig(), C4QualityConfig(), FineWebQualityConfig()]


def load_texts(max_docs: int | None) -> list[str]:
    texts = []
    for path in INPUTS:
        with open(path) as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts[:max_docs] if max_docs else texts


def build_steps(side: str, cfgs=None) -> list:
    from kiln.data_pipeline.filters import build_filter
    from kiln.data_pipeline.filters.text_analysis import splitter

    if side == "kiln":
        splitter.cache_clear()  # a fresh tokenizer and empty caches for every run
    return [build_filter(replace(c, implementation=side)) for c in (cfgs or recipe_configs())]


def _record_decisions(step, index: int, verdicts: dict) -> None:
    """Wrap ``step.filter`` to note, per document id, the first filter that dropped it and why."""
    original = step.filter

    def recording(doc):
        res = original(doc)
        if res is not True and doc.id not in verdicts:
            verdicts[doc.id] = (index, step.name, res if isinstance(res, tuple) else (res, None))
        return res

    step.filter = recording


def run_chain(side: str, texts: list[str]) -> tuple[float, dict, dict]:
    """CPU seconds of one pass of the four-filter chain; per document id its verdict, and each kept text."""
    from datatrove.data import Document

    steps = build_steps(side)
    verdicts: dict = {}
    for i, step in enumerate(steps):
        _record_decisions(step, i, verdicts)
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    pipeline = iter(docs)
    for step in steps:
        pipeline = step.run(pipeline)
    start = time.process_time()
    kept = {doc.id: doc.text for doc in pipeline}
    cpu = time.process_time() - start
    return cpu, verdicts, kept


def run_single(step, texts: list[str]) -> tuple[float, list]:
    """CPU seconds of one filter alone on every document; per document (result, text after)."""
    from datatrove.data import Document

    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    start = time.process_time()
    results = [step.filter(doc) for doc in docs]
    cpu = time.process_time() - start
    return cpu, [(r, d.text) for r, d in zip(results, docs)]


def compare(a_verdicts, a_kept, b_verdicts, b_kept, texts) -> None:
    for i in range(len(texts)):
        key = str(i)
        a = (a_verdicts.get(key), a_kept.get(key))
        b = (b_verdicts.get(key), b_kept.get(key))
        if a != b:
            raise SystemExit(f"decision mismatch on document {i} ({texts[i][:80]!r}): datatrove {a[0]}, kiln {b[0]}")


def process_start_cost(side: str) -> dict:
    """CPU seconds for a fresh process to build the four filters and filter one document."""
    code = (
        "import sys\n"
        "from dataclasses import replace\n"
        "from datatrove.data import Document\n"
        "from benchmarks.filters import recipe_configs\n"
        "from kiln.data_pipeline.filters import build_filter\n"
        f"steps = [build_filter(replace(c, implementation={side!r})) for c in recipe_configs()]\n"
        "doc = Document(text='The river has shaped the valley for thousands of years. ' * 20, id='0')\n"
        "for s in steps: s.filter(doc)\n"
        "print('torch' in sys.modules)\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "torch": out.stdout.strip().splitlines()[-1] == "True"}


def warm_up(texts: list[str]) -> None:
    """Import spaCy and load datatrove's tokenizer outside the timed passes (both sides use spaCy)."""
    from datatrove.utils.text import split_into_words

    from kiln.data_pipeline.filters.text_analysis import splitter

    split_into_words(texts[0][:1000])
    splitter("en").words(texts[0][:1000])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-docs", type=int, default=None, help="first N documents (web pages, then C4 demo)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-per-filter", action="store_true", help="skip the per-filter pass")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/filters.md")
    args = p.parse_args()

    missing = [str(f) for f in INPUTS if not f.exists()]
    if missing:
        raise SystemExit(f"benchmark input not found: {', '.join(missing)} (the shared sample data)")
    from datatrove.utils.logging import logger

    logger.remove()
    texts = load_texts(args.max_docs)
    n_docs, n_chars = len(texts), sum(map(len, texts))
    load_before = os.getloadavg()[0]
    starts = {side: process_start_cost(side) for side in SIDES}
    warm_up(texts)

    cpu = {side: [] for side in SIDES}
    reference = None
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        runs = {}
        for side in order:
            seconds, verdicts, kept = run_chain(side, texts)
            cpu[side].append(seconds)
            runs[side] = (verdicts, kept)
            print(f"round {r + 1} {side}: {seconds:.2f} CPU s", flush=True)
        compare(*runs["datatrove"], *runs["kiln"], texts)
        if reference is None:
            reference = runs["datatrove"]
        compare(*reference, *runs["kiln"], texts)  # and the same in every round
    verdicts, kept = reference

    per_filter = {}
    if not args.no_per_filter:
        for cfg in recipe_configs():
            row = {}
            for side in SIDES:
                (step,) = build_steps(side, [cfg])
                row[side], row[side + "_results"] = run_single(step, texts)
            if row["datatrove_results"] != row["kiln_results"]:
                bad = next(i for i, (a, b) in enumerate(zip(row["datatrove_results"], row["kiln_results"])) if a != b)
                raise SystemExit(f"{cfg.kind}: decision mismatch on document {bad}")
            row["dropped"] = sum(res is not True for res, _ in row["kiln_results"])
            per_filter[cfg.kind] = row
            print(f"{cfg.kind}: datatrove {row['datatrove']:.2f} s, kiln {row['kiln']:.2f} s", flush=True)
    load_after = os.getloadavg()[0]

    total = {side: sum(cpu[side]) for side in SIDES}
    ratio = total["datatrove"] / total["kiln"]
    per_round = [d / k for d, k in zip(cpu["datatrove"], cpu["kiln"])]
    reasons: dict[str, int] = {}
    for _, name, (_, reason) in verdicts.values():
        reasons[f"{name.split(' ', 1)[-1]}: {reason}"] = reasons.get(f"{name.split(' ', 1)[-1]}: {reason}", 0) + 1

    from importlib.metadata import version

    lines = [
        f"## {datetime.date.today()} — {platform.node() or 'machine'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "",
        f"Command: `{' '.join(['python -m benchmarks.filters', *sys.argv[1:]])}`",
        f"Python {platform.python_version()}, datatrove {version('datatrove')}, spaCy {version('spacy')}. Load average {load_before:.1f} before, {load_after:.1f} after (the machine is "
        "shared; CPU time, interleaved rounds).",
        f"Input: {n_docs} documents ({n_chars:,} characters): shared web pages then the C4 demo. Chain: Gopher "
        "repetition -> Gopher quality -> C4 -> FineWeb, default configs, as datatrove pipeline steps.",
        "",
        "| side | CPU s per round | total CPU s | docs/s per core |",
        "|---|---|---:|---:|",
    ]
    for side in SIDES:
        rounds = ", ".join(f"{s:.2f}" for s in cpu[side])
        lines.append(f"| {side} | {rounds} | {total[side]:.2f} | {n_docs * args.rounds / total[side]:.1f} |")
    met = "met" if ratio >= GOAL else "NOT met"
    lines += [
        "",
        f"Per-core throughput ratio kiln/datatrove: **{ratio:.2f}x** (rounds: "
        f"{', '.join(f'{x:.2f}x' for x in per_round)}); goal >= {GOAL:.0f}x: **{met}**.",
        f"Decisions: identical for all {n_docs} documents in every round (filter, reason, kept text): "
        f"kept {len(kept)}, dropped {len(verdicts)} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))}).",
    ]
    if per_filter:
        lines += [
            "",
            "Each filter alone on every document (one pass, CPU s; decisions, reasons and texts identical):",
            "",
            "| filter | datatrove | kiln | ratio | dropped |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind, row in per_filter.items():
            lines.append(
                f"| {kind} | {row['datatrove']:.2f} | {row['kiln']:.2f} | {row['datatrove'] / row['kiln']:.1f}x "
                f"| {row['dropped']} |"
            )
        d = sum(row["datatrove"] for row in per_filter.values())
        k = sum(row["kiln"] for row in per_filter.values())
        lines.append(f"| all four | {d:.2f} | {k:.2f} | {d / k:.1f}x | |")
    lines += [
        "",
        "Fresh process, build the four filters and filter one document (imports + tokenizer load), CPU s: "
        + ", ".join(
            f"{side} {starts[side]['cpu_s']:.2f} (torch imported: {'yes' if starts[side]['torch'] else 'no'})"
            for side in SIDES
        )
        + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        append_result(
            RESULTS, "Quality filters benchmark: Kiln vs datatrove stock filters", "benchmarks/filters.py", text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
