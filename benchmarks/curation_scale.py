"""Curation cost curves: Kiln vs datatrove's stock steps, full filter + dedup pipeline, at growing corpus sizes.

For each size N (``--sizes 1000 10000 100000``) a corpus of N documents is built from the shared web pages
(``../shared/data/web/wceb_modern_1000_url_text.jsonl``) by seeded mutation, so the documents are distinct:

- a base document is a random window (50-100% of the lines) of a page, with the sentences of each line shuffled
  and ~15% word-level edits (deletions, substitutions and insertions of words drawn from the pages' own word
  distribution, so stop-word and alphabetic ratios stay web-like); two bases from the same page share few
  word 5-grams (J ~ 0.1);
- ``--pair-fraction`` of the documents are planted near-duplicates: a copy of a base document with word
  substitutions at random positions, the number of substitutions found by binary search so that the Jaccard
  similarity of the two documents' word 5-gram shingles (lowercased whitespace-split words, computed exactly)
  is the largest value >= the target level (0.5, 0.7, 0.8, 0.9, 0.95 and 1.0 = exact copy, round robin).

Both sides are those of ``benchmarks/curation.py`` (the same filters, datatrove's stock classes on its side; exact
dedup + MinHash word 5-grams, 14 buckets x 8 hashes), each run in its own subprocess, one after the other per
size, with the same tasks/workers. Reported per side: wall seconds, docs/s (input documents / wall), CPU seconds
of the whole process tree (user + system, sampled every 20 ms per process, last sample per process summed), peak
summed RSS of the tree, and dedup recall/precision against the planted pairs: a pair counts when both documents
passed the filters (read from each side's post-filter folder); it is found when dedup removed at least one of
them. Precision is the share of documents removed by dedup that are a member of a planted pair.

Usage (from the repository root)::

    python -m benchmarks.curation_scale --sizes 1000 10000
    python -m benchmarks.curation_scale --sizes 1000 10000 100000   # hours on a 2-core machine

Results are appended to benchmarks/results/curation_scale.md (command, date, machine, load average) and the plot
of cost against size is written to benchmarks/results/curation_scale.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.curation import measure_side
from benchmarks.record import append_result

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SOURCE = REPO.parent / "shared" / "data" / "web" / "wceb_modern_1000_url_text.jsonl"
RESULTS = REPO / "benchmarks" / "results" / "curation_scale.md"
PLOT = REPO / "benchmarks" / "results" / "curation_scale.png"
LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
SIDES = ("datatrove", "kiln")
_SENT = re.compile(r"(?<=[.!?])\s+")
_TOKENS = re.compile(r"(\s+)")


def shingles(text: str, n: int = 5) -> set:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(0, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def load_pages(path: Path) -> list[dict]:
    pages = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("text", "").strip():
                pages.append({"text": rec["text"], "url": rec.get("url")})
    return pages


def mutate_page(text: str, rng: random.Random, vocab: list[str], edit_rate: float = 0.15) -> str:
    """A distinct document from a page: a window of its lines, sentences shuffled per line, word-level edits."""
    lines = text.split("\n")
    n = len(lines)
    w = max(1, int(n * rng.uniform(0.5, 1.0)))
    start = rng.randint(0, n - w)
    out = []
    third = edit_rate / 3
    for line in lines[start : start + w]:
        if not line.strip():
            out.append(line)
            continue
        sents = _SENT.split(line)
        if len(sents) > 1:
            rng.shuffle(sents)
        new = []
        for word in " ".join(sents).split():
            r = rng.random()
            if r >= edit_rate:
                new.append(word)
            elif r < third:
                continue  # deletion
            elif r < 2 * third:
                new.append(rng.choice(vocab))  # substitution
            else:
                new.append(word)
                new.append(rng.choice(vocab))  # insertion
        out.append(" ".join(new))
    return "\n".join(out)


def plant_variant(text: str, target: float, rng: random.Random, vocab: list[str]) -> tuple[str, float]:
    """A copy of ``text`` with word substitutions: the most substitutions (binary search) keeping J >= target."""
    if target >= 1.0:
        return text, 1.0
    parts = _TOKENS.split(text)  # words at even indices, whitespace at odd ones
    word_idx = [i for i in range(0, len(parts), 2) if parts[i]]
    order = rng.sample(word_idx, len(word_idx))
    repl = [rng.choice(vocab) for _ in order]
    base = shingles(text)

    def variant(k: int) -> str:
        p = list(parts)
        for i, w in zip(order[:k], repl[:k]):
            p[i] = w
        return "".join(p)

    lo, hi = 0, len(order)  # J(lo) >= target invariant
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if jaccard(base, shingles(variant(mid))) >= target:
            lo = mid
        else:
            hi = mid - 1
    v = variant(lo)
    return v, jaccard(base, shingles(v))


def build_corpus(out: Path, n_docs: int, pages: list[dict], tasks: int, pair_fraction: float, seed: int) -> dict:
    """Write ``n_docs`` documents to ``tasks`` JSONL shards; return the planted pairs (id_a, id_b, level, J)."""
    rng = random.Random(seed)
    vocab = [w for p in pages[:200] for w in p["text"].split()]
    n_pairs = int(n_docs * pair_fraction / 2)
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"part{i:02d}.jsonl", "wb") for i in range(tasks)]
    pairs = []
    written = 0

    def write(doc_id: str, text: str, url: str | None) -> None:
        nonlocal written
        files[written % tasks].write(orjson.dumps({"id": doc_id, "text": text, "url": url}) + b"\n")
        written += 1

    try:
        b = 0
        while written < n_docs:
            page = pages[rng.randrange(len(pages))]
            text = mutate_page(page["text"], rng, vocab)
            base_id = f"d{b}"
            write(base_id, text, page["url"])
            if len(pairs) < n_pairs and written < n_docs:
                level = LEVELS[len(pairs) % len(LEVELS)]
                vtext, j = plant_variant(text, level, rng, vocab)
                write(f"{base_id}-j{level}", vtext, page["url"])
                pairs.append((base_id, f"{base_id}-j{level}", level, j))
            b += 1
    finally:
        for f in files:
            f.close()
    return {"pairs": pairs, "docs": written}


def _ids(folder: Path) -> set[str]:
    from kiln.data_pipeline.runner import iter_output

    return {str(r["id"]) for r in iter_output(folder)} if folder.exists() else set()


def dedup_quality(pairs: list, filtered: set[str], kept: set[str]) -> dict:
    removed = filtered - kept
    members = {a for a, *_ in pairs} | {b for _, b, *_ in pairs}
    by_level: dict = {}
    for a, b, level, _j in pairs:
        if a in filtered and b in filtered:
            c = by_level.setdefault(level, [0, 0])
            c[0] += 1
            c[1] += (a in removed) or (b in removed)
    hi = [by_level.get(lv, [0, 0]) for lv in LEVELS if lv >= 0.8]
    eligible_hi = sum(c[0] for c in hi)
    return {
        "filtered": len(filtered),
        "kept": len(kept),
        "removed_by_dedup": len(removed),
        "precision": len(removed & members) / len(removed) if removed else float("nan"),
        "recall_all": sum(c[1] for c in by_level.values()) / max(1, sum(c[0] for c in by_level.values())),
        "recall_ge_0.8": sum(c[1] for c in hi) / eligible_hi if eligible_hi else float("nan"),
        "pairs_eligible_ge_0.8": eligible_hi,
        "recall_by_level": {lv: (c[1] / c[0] if c[0] else float("nan"), c[0]) for lv, c in sorted(by_level.items())},
    }


def measure(side: str, inp: Path, work: Path, tasks: int, workers: int) -> dict:
    """Run one side of benchmarks/curation.py in a subprocess: wall, tree CPU seconds, peak summed tree RSS."""
    args = ["--side", side, "--input", str(inp), "--work", str(work), "--tasks", str(tasks), "--workers", str(workers)]
    result = measure_side(args)
    result["kept_reported"] = result.pop("kept")
    return result


def post_filter_and_kept(side: str, work: Path) -> tuple[set[str], set[str]]:
    if side == "kiln":
        return _ids(work / "kiln" / "work" / "filtered"), _ids(work / "kiln" / "output")
    return _ids(work / "datatrove" / "filtered"), _ids(work / "datatrove" / "out")


def run_size(n: int, pages: list[dict], args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        corpus = build_corpus(tmp / "input", n, pages, args.tasks, args.pair_fraction, args.seed + n)
        gen_s = time.perf_counter() - t0
        js = [j for *_, j in corpus["pairs"]]
        res = {
            "n": corpus["docs"],
            "pairs": len(corpus["pairs"]),
            "gen_s": gen_s,
            "j_min_by_level": {
                lv: min((j for *_, lev, j in corpus["pairs"] if lev == lv), default=float("nan")) for lv in LEVELS
            },
            "j_mean": sum(js) / len(js) if js else float("nan"),
            "load_before": os.getloadavg(),
        }
        for side in SIDES:
            r = measure(side, tmp / "input", tmp, args.tasks, args.workers)
            filtered, kept = post_filter_and_kept(side, tmp)
            r.update(dedup_quality(corpus["pairs"], filtered, kept))
            r["docs_per_s"] = res["n"] / r["seconds"]
            res[side] = r
            print(f"  N={n} {side}: {r['seconds']:.1f} s, peak {r['peak_rss_mib']:.0f} MiB", flush=True)
        res["load_after"] = os.getloadavg()
    return res


def load_rows(paths: list[str], skip: set[int]) -> list[dict]:
    """Rows of earlier runs' ``--json`` files, sizes in ``skip`` left out. JSON turned the recall-by-level keys
    (planted J levels) into strings and the load averages into lists: both are turned back."""
    rows = []
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge-json {path}: cannot read it as a --json file of this script ({e})") from e
        for row in loaded:
            if row["n"] in skip:
                continue
            row["j_min_by_level"] = {float(k): v for k, v in row["j_min_by_level"].items()}
            for side in SIDES:
                row[side]["recall_by_level"] = {float(k): tuple(v) for k, v in row[side]["recall_by_level"].items()}
            row.setdefault("command", f"(a run recorded in {path})")
            rows.append(row)
    return rows


def _slope(rows: list[dict], side: str, key: str) -> float:
    a, b = rows[0], rows[-1]
    if len(rows) < 2 or a["n"] == b["n"]:
        return float("nan")
    return math.log(b[side][key] / a[side][key]) / math.log(b["n"] / a["n"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in rows]
    for ax, key, label in [(axes[0], "seconds", "wall seconds"), (axes[1], "peak_rss_mib", "peak RSS (MiB)")]:
        for side, marker, color in zip(SIDES, "os", ("tab:blue", "tab:orange")):
            ax.plot(ns, [r[side][key] for r in rows], marker=marker, color=color, label=side)
            if key == "seconds":
                cpu = [r[side]["cpu_s"] for r in rows]
                ax.plot(ns, cpu, marker=marker, color=color, linestyle="--", label=f"{side} CPU s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("documents")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title("filter + dedup cost")
    axes[1].set_title("peak RSS, process tree")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], args, command: str) -> str:
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — {platform.node() or 'machine'}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "",
        f"Command: `{command}`",
        f"Python {platform.python_version()}; {args.tasks} tasks, {args.workers} workers; pair fraction "
        f"{args.pair_fraction}; seed {args.seed}.",
        "",
        "| N | side | seconds | docs/s | CPU s | CPU ms/doc | peak RSS MiB | passed filters | kept | dedup removed "
        "| precision | recall (all) | recall J>=0.8 | load before / after |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lb = "/".join(f"{x:.2f}" for x in r["load_before"])
        la = "/".join(f"{x:.2f}" for x in r["load_after"])
        for side in SIDES:
            s = r[side]
            lines.append(
                f"| {r['n']} | {side} | {s['seconds']:.1f} | {s['docs_per_s']:.1f} | {s['cpu_s']:.1f} | "
                f"{1000 * s['cpu_s'] / r['n']:.1f} | {s['peak_rss_mib']:.0f} | {s['filtered']} | {s['kept']} | "
                f"{s['removed_by_dedup']} | {s['precision']:.3f} | {s['recall_all']:.3f} | "
                f"{s['recall_ge_0.8']:.3f} ({s['pairs_eligible_ge_0.8']} pairs) | {lb} → {la} |"
            )
    lines += [
        "",
        "Recall by planted level (found / pairs where both passed the filters), and the lowest planted J:",
        "",
    ]
    lines += ["| N | side | " + " | ".join(f"J={lv}" for lv in LEVELS) + " |", "|---:|---|" + "---:|" * len(LEVELS)]
    for r in rows:
        lines.append(
            f"| {r['n']} | planted min J | " + " | ".join(f"{r['j_min_by_level'][lv]:.3f}" for lv in LEVELS) + " |"
        )
        for side in SIDES:
            rb = r[side]["recall_by_level"]
            cells = [f"{rb[lv][0]:.2f} ({rb[lv][1]})" if lv in rb else "–" for lv in LEVELS]
            lines.append(f"| {r['n']} | {side} | " + " | ".join(cells) + " |")
    commands = sorted({r["command"] for r in rows})
    if len(commands) > 1:  # rows merged from earlier runs (--merge-json): say which command measured which size
        lines += ["", "Sizes by command: " + "; ".join(
            f"N={', '.join(str(r['n']) for r in rows if r['command'] == c)}: `{c}`" for c in commands
        ) + "."]  # fmt: skip
    big = rows[-1]
    ratio = big["kiln"]["docs_per_s"] / big["datatrove"]["docs_per_s"]
    cpu_ratio = big["datatrove"]["cpu_s"] / big["kiln"]["cpu_s"]
    lines += [
        "",
        "Corpus generation (not timed in the table): "
        + ", ".join(f"N={r['n']} {r['gen_s']:.0f} s ({r['pairs']} pairs)" for r in rows)
        + ".",
        f"Throughput ratio kiln/datatrove at N={big['n']}: **{ratio:.2f}x** wall, {cpu_ratio:.2f}x CPU.",
    ]
    if len(rows) > 1:
        lines.append(
            f"Growth exponents N={rows[0]['n']}→{rows[-1]['n']} (log-log slope): wall seconds datatrove "
            f"{_slope(rows, 'datatrove', 'seconds'):.2f}, kiln {_slope(rows, 'kiln', 'seconds'):.2f}; peak RSS "
            f"datatrove {_slope(rows, 'datatrove', 'peak_rss_mib'):.2f}, kiln {_slope(rows, 'kiln', 'peak_rss_mib'):.2f}."
        )
    has_100k = any(r["n"] >= 100_000 for r in rows)
    recall_ok = all(r["kiln"]["recall_ge_0.8"] >= 0.95 for r in rows)
    mem_ok = len(rows) > 1 and _slope(rows, "kiln", "peak_rss_mib") <= _slope(rows, "datatrove", "peak_rss_mib")
    lines += [
        "Goals: throughput at 100k >= 2x: "
        + (
            f"wall **{'met' if ratio >= 2 else 'not met'}** ({ratio:.2f}x), CPU seconds **"
            f"{'met' if cpu_ratio >= 2 else 'not met'}** ({cpu_ratio:.2f}x; the measure that holds when other jobs "
            "load the machine: see the load averages)"
            if has_100k
            else "**not measured** (no 100k run)"
        )
        + "; memory growing no faster than datatrove's: "
        + (f"**{'met' if mem_ok else 'not met'}**" if len(rows) > 1 else "**not measured** (one size)")
        + ("" if has_100k or len(rows) < 2 else f" (up to N={big['n']})")
        + f"; Kiln recall >= 0.95 at J >= 0.8 at every size: **{'met' if recall_ok else 'not met'}**.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pair-fraction", type=float, default=0.2, help="share of documents in planted pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the temporary corpora and run folders go")
    p.add_argument("--json", default=None, help="also write the raw per-size results here (after each size)")
    p.add_argument("--no-record", action="store_true", help="do not append to the results file or write the plot")
    p.add_argument(
        "--merge-json",
        nargs="+",
        default=[],
        metavar="FILE",
        help="rows of earlier runs (their --json files) to report and plot with this run's sizes; a size run now "
        "replaces the same size from a file. Each row keeps the command that measured it",
    )
    args = p.parse_args()
    if not SOURCE.exists():
        print(f"skipped: shared web pages not found at {SOURCE} (the shared sample data)", file=sys.stderr)
        return 0
    pages = load_pages(SOURCE)
    command = " ".join(["python -m benchmarks.curation_scale", *sys.argv[1:]])
    merged = load_rows(args.merge_json, skip=set(args.sizes))
    rows = []
    for n in sorted(args.sizes):
        print(f"N={n}: building corpus and running both sides", flush=True)
        rows.append(run_size(n, pages, args) | {"command": command})
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    rows = sorted(rows + merged, key=lambda r: r["n"])
    text = report(rows, args, command)
    print(text)
    if not args.no_record:
        append_result(
            RESULTS, "Curation cost curves: Kiln vs datatrove stock steps", "benchmarks/curation_scale.py", text
        )
        plot(rows, PLOT)
        print(f"plot: {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
