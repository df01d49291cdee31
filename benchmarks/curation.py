"""Full curation pipeline: Kiln vs datatrove's stock steps configured the same way, same input, one run.

Both sides: the same quality filters (datatrove's stock Gopher repetition, Gopher quality, C4 and FineWeb
filters; language ID through our offline filter on both sides, because datatrove's LanguageFilter downloads
its fastText model at run time and there is no network here), then exact dedup and MinHash-LSH dedup (word
5-grams, 14 buckets x 8 hashes). URL dedup is off on our side: datatrove 0.10.1 ships no URL dedup step.

- Kiln: `kiln.data_pipeline.runner` with the recipe below (one read, signatures computed in the filtering pass).
- datatrove: its stock filter classes (`implementation: datatrove`: our heuristic filters are the recipe default
  and must not run on this side), then the FineWeb-example layout: filter -> write; read -> MinhashDedupSignature;
  MinhashDedupBuckets; MinhashDedupCluster; read -> MinhashDedupFilter -> write; read -> ExactDedupSignature;
  ExactFindDedups; read -> ExactDedupFilter -> write.

Each side runs in its own subprocess with the same tasks/workers; we report wall time, docs/s (input
documents / wall seconds) and the peak summed RSS of its process tree (sampled every 20 ms). The MinHash
signature+bucketing comparison comes from `benchmarks/minhash_stages.py` in the same run.

Usage (from the repository root):

    python -m benchmarks.curation                 # shared web sample + 1 near-copy per page, 4 tasks
    python -m benchmarks.curation --tasks 2 --copies 0 --max-docs 500

Results are appended to benchmarks/results/curation.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "curation.md"
FILTERS = [
    {"kind": "language"},
    {"kind": "gopher_repetition"},
    {"kind": "gopher_quality"},
    {"kind": "c4"},
    {"kind": "fineweb"},
]
MINHASH = {"ngram": 5, "buckets": 14, "hashes_per_bucket": 8}


def build_recipe(inp: Path, work: Path, tasks: int, workers: int):
    """Our recipe for the benchmark; the datatrove side builds its filters from the same configs."""
    from kiln.config import build_dataclass
    from kiln.data_pipeline.recipe import DataRecipe

    return build_dataclass(
        DataRecipe,
        {
            "name": "bench",
            "output_dir": str(work / "kiln"),
            "inputs": [{"kind": "jsonl", "path": str(inp)}],
            "filters": FILTERS,
            "dedup": {"exact": True, "url": False, "minhash": MINHASH},
            "executor": {"kind": "local", "tasks": tasks, "workers": workers},
            "progress": False,
        },
        source="benchmark recipe",
    )


def run_kiln(inp: Path, work: Path, tasks: int, workers: int) -> int:
    from kiln.data_pipeline.accounting import build_report
    from kiln.data_pipeline.runner import run_recipe

    run_recipe(build_recipe(inp, work, tasks, workers))
    return build_report(work / "kiln").kept


def normalised_text(doc) -> str:
    """Same normalisation as our exact dedup defaults (lowercase, collapsed whitespace)."""
    return " ".join(doc.text.lower().split())


def stock(cfg):
    """The same filter config with datatrove's stock class: the heuristic filters default to our faster subclasses
    (``implementation: kiln``), which would otherwise put our filters on the datatrove side too."""
    if hasattr(cfg, "implementation"):
        return dataclasses.replace(cfg, implementation="datatrove")
    return cfg


def run_datatrove(inp: Path, work: Path, tasks: int, workers: int) -> int:
    from datatrove.executor import LocalPipelineExecutor as Local
    from datatrove.pipeline.dedup import (
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from kiln.data_pipeline.filters import build_filter
    from kiln.data_pipeline.runner import iter_output

    filters = [build_filter(stock(cfg)) for cfg in build_recipe(inp, work, tasks, workers).filters]
    d = work / "datatrove"
    mh = MinhashConfig(
        n_grams=MINHASH["ngram"], num_buckets=MINHASH["buckets"], hashes_per_bucket=MINHASH["hashes_per_bucket"]
    )
    ex_cfg = ExactDedupConfig(content_getter=normalised_text)

    def stage(name, pipeline, n=tasks, depends=None):
        return Local(pipeline, tasks=n, workers=min(n, workers), logging_dir=str(d / "logs" / name), depends=depends)

    s1 = stage("filter", [JsonlReader(str(inp)), *filters, JsonlWriter(str(d / "filtered"))])
    s2 = stage(
        "mh_sig", [JsonlReader(str(d / "filtered")), MinhashDedupSignature(str(d / "mh_sigs"), config=mh)], depends=s1
    )
    s3 = stage(
        "mh_buckets",
        [MinhashDedupBuckets(str(d / "mh_sigs"), str(d / "mh_buckets"), config=mh)],
        n=mh.num_buckets,
        depends=s2,
    )
    s4 = stage(
        "mh_cluster", [MinhashDedupCluster(str(d / "mh_buckets"), str(d / "mh_remove"), config=mh)], n=1, depends=s3
    )
    s5 = stage(
        "mh_filter",
        [JsonlReader(str(d / "filtered")), MinhashDedupFilter(str(d / "mh_remove")), JsonlWriter(str(d / "mh_out"))],
        depends=s4,
    )
    s6 = stage(
        "ex_sig", [JsonlReader(str(d / "mh_out")), ExactDedupSignature(str(d / "ex_sigs"), config=ex_cfg)], depends=s5
    )
    s7 = stage("ex_find", [ExactFindDedups(str(d / "ex_sigs"), str(d / "ex_dups"), config=ex_cfg)], n=1, depends=s6)
    s8 = stage(
        "ex_filter",
        [
            JsonlReader(str(d / "mh_out")),
            ExactDedupFilter(str(d / "ex_dups"), config=ex_cfg),
            JsonlWriter(str(d / "out")),
        ],
        depends=s7,
    )
    s8.run()
    return sum(1 for _ in iter_output(d / "out"))


def measure_side(args: list[str]) -> dict:
    """Run one side (``python -m benchmarks.curation --side ...``) in a subprocess: wall time, CPU seconds of its
    process tree (each process's last sample, so exited workers count) and peak RSS summed over the tree."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.curation", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    root = psutil.Process(proc.pid)
    peak = 0
    cpu: dict[tuple[int, float], float] = {}
    while proc.poll() is None:
        rss = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:  # the process ended between listing and sampling
                pass
        peak = max(peak, rss)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark side failed ({args}): exit {proc.returncode}")
    kept = json.loads(out.strip().splitlines()[-1])["kept"]
    return {"seconds": wall, "cpu_s": sum(cpu.values()), "peak_rss_mib": peak / 2**20, "kept": kept}


def write_input(out: Path, docs: list, tasks: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(tasks):
        with open(out / f"part{i:02d}.jsonl", "wb") as f:
            for d in docs[i::tasks]:
                f.write(orjson.dumps({"id": d.id, "text": d.text, "url": d.metadata.get("url")}) + b"\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-docs", type=int, default=1000)
    p.add_argument("--copies", type=int, default=1, help="near-duplicate copies per page (1%% of words replaced)")
    p.add_argument("--side", choices=["kiln", "datatrove"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/curation.md")
    args = p.parse_args()

    if args.side:  # child mode: run one side, print {"kept": n}
        from datatrove.utils.logging import logger

        logger.remove()
        run = run_kiln if args.side == "kiln" else run_datatrove
        print(json.dumps({"kept": run(Path(args.input), Path(args.work), args.tasks, args.workers)}))
        return 0

    from benchmarks.minhash_stages import DEFAULT_INPUT, compare_minhash, load_docs

    if not DEFAULT_INPUT.exists():
        raise SystemExit(f"benchmark input not found: {DEFAULT_INPUT} (the shared sample data)")
    docs = load_docs(DEFAULT_INPUT, args.max_docs, args.copies, mutate=0.01)
    n_docs = len(docs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_input(tmp / "input", docs, args.tasks)
        common = [
            "--input",
            str(tmp / "input"),
            "--work",
            str(tmp),
            "--tasks",
            str(args.tasks),
            "--workers",
            str(args.workers),
        ]
        results = {side: measure_side(["--side", side, *common]) for side in ("datatrove", "kiln")}
        minhash = compare_minhash(docs, str(tmp / "minhash"), tasks=1)

    for r in results.values():
        r["docs_per_s"] = n_docs / r["seconds"]
    ratio = results["kiln"]["docs_per_s"] / results["datatrove"]["docs_per_s"]
    sig_bucket = minhash.get("speedup_signature_plus_buckets")
    lines = [
        f"## {datetime.date.today()} — {platform.node() or 'machine'}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "",
        f"Command: `{' '.join(['python -m benchmarks.curation', *sys.argv[1:]])}`",
        f"Input: {n_docs} documents (shared web sample, {args.copies} near-copy per page), {args.tasks} tasks, {args.workers} workers.",
        "",
        "| pipeline | seconds | docs/s | peak RSS MiB | kept |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in ("datatrove", "kiln"):
        r = results[side]
        lines.append(f"| {side} | {r['seconds']:.1f} | {r['docs_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['kept']} |")
    lines += [
        "",
        f"Throughput ratio kiln/datatrove: **{ratio:.2f}x**. MinHash signature+bucketing speed-up: **{sig_bucket:.1f}x**.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
