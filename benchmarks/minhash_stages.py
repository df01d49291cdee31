"""MinHash dedup speed: datatrove's MinhashDedupSignature + MinhashDedupBuckets vs ours, on the same documents.

Both sides use 5-grams and 14 buckets x 8 hashes. Ours runs MinHash only (exact and URL dedup off), with its
default candidate verification. Every stage runs in its own forked process, so its peak RSS is its own (the
documents are inherited from the parent, so ``start_rss_mib`` is subtracted to get ``extra_rss_mib``). The
clustering stages (datatrove's MinhashDedupCluster vs our ClusterDuplicates) are timed too but are not part of
the ratio.

Usage::

    python benchmarks/minhash_stages.py          # shared web sample + 1 near-copy of each doc (1% words replaced)
    python benchmarks/minhash_stages.py --input docs.jsonl --copies 0 --tasks 2
    python benchmarks/minhash_stages.py --synthetic 200000 --tasks 4   # bucket + cluster stages at scale

Recorded (2026-11-25, the shared 2-core CPU dev machine under load from other jobs, load average 4-9, so
absolute times are inflated; both sides ran in the same invocation):

``python benchmarks/minhash_stages.py`` (1000 web pages + 1 near-copy each = 2000 docs, ~1,860 words/page)::

    stage                   seconds    docs/s  peak RSS MiB  extra RSS MiB  result
    datatrove_signature       76.01        26           406             43
    datatrove_buckets          0.08     23986            92              2  pairs=7145
    datatrove_cluster          0.02     89401            92              2  removed=1022
    ours_signature             3.11       643           112             22
    ours_buckets               0.03     59105            94              4  pairs=7182
    ours_cluster               0.02     92492            95              5  removed=1023
    speedup_signature: 24.4x   speedup_buckets: 2.5x   speedup_signature_plus_buckets: 24.2x

``python benchmarks/minhash_stages.py --synthetic 300000 --tasks 4 --dup-fraction 0.3``::

    stage                   seconds    docs/s  peak RSS MiB  extra RSS MiB  result
    datatrove_buckets         24.04     12481            85              2  pairs=791282
    datatrove_cluster          4.76     63006           100             17  removed=90000
    ours_buckets               0.73    412193            87              5  pairs=791282
    ours_cluster               0.60    496567            88              5  removed=90000
    speedup_buckets: 33.0x   speedup_cluster: 7.9x
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import string
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datatrove.data import Document

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_INPUT = REPO.parent / "shared" / "data" / "web" / "wceb_modern_1000_url_text.jsonl"


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _in_child(fn: Callable[[], dict], setup: Callable[[], None] | None = None) -> dict:
    """Run ``fn`` in a forked process (after an untimed ``setup``); return its result, seconds and memory."""
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)

    def target():
        from datatrove.utils.logging import logger

        logger.remove()
        if setup is not None:
            setup()
        start = _rss_mib("VmRSS")
        t0 = time.perf_counter()
        extra = fn()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_conn.send(
            {"seconds": seconds, "peak_rss_mib": peak, "start_rss_mib": start, "extra_rss_mib": peak - start, **extra}
        )

    proc = ctx.Process(target=target)
    proc.start()
    result = parent_conn.recv()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark stage failed with exit code {proc.exitcode}")
    return result


def _shards(docs: list[Document], tasks: int) -> list[list[Document]]:
    return [docs[r::tasks] for r in range(tasks)]


def compare_minhash(docs: list[Document], workdir: str, tasks: int = 1) -> dict:
    """Time each MinHash stage of datatrove and of ours on ``docs`` split over ``tasks`` ranks (run in turn)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig as DatatroveMinhashConfig
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature

    from kiln.data_pipeline.dedup import DedupConfig, DedupSignatures, MinhashConfig, find_duplicate_stages

    work = Path(workdir)
    shards = _shards(docs, tasks)
    dt_cfg = DatatroveMinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    ours_cfg = DedupConfig(exact=False, url=False, minhash=MinhashConfig(ngram=5, buckets=14, hashes_per_bucket=8))

    dt_sig_step = MinhashDedupSignature(output_folder=str(work / "dt" / "sigs"), config=dt_cfg)

    def dt_warmup():  # load spaCy's English tokenizer outside the timed region
        dt_sig_step.word_tokenizer.word_tokenize("warm up the tokenizer")

    def dt_signature():
        step = dt_sig_step
        for rank, shard in enumerate(shards):
            step.run(iter(shard), rank, tasks)
        return {}

    def dt_buckets():
        step = MinhashDedupBuckets(
            input_folder=str(work / "dt" / "sigs"), output_folder=str(work / "dt" / "buckets"), config=dt_cfg
        )
        for bucket in range(dt_cfg.num_buckets):
            step.run(None, bucket, dt_cfg.num_buckets)
        pairs = sum(p.stat().st_size // 16 for p in (work / "dt" / "buckets").glob("*.dups"))
        return {"pairs": int(pairs)}

    def dt_cluster():
        step = MinhashDedupCluster(
            input_folder=str(work / "dt" / "buckets"), output_folder=str(work / "dt" / "remove"), config=dt_cfg
        )
        step.run(None, 0, 1)
        removed = sum(p.stat().st_size // 4 for p in (work / "dt" / "remove").glob("*.remove"))
        return {"removed": int(removed)}

    middle = find_duplicate_stages(ours_cfg, work / "ours", num_input_tasks=tasks)

    def ours_signature():
        step = DedupSignatures(ours_cfg, work / "ours")
        for rank, shard in enumerate(shards):
            deque(step.run(iter(shard), rank, tasks), maxlen=0)
        return {}

    def ours_buckets():
        (step,), n = middle[0]
        for rank in range(n):
            step.run(None, rank, n)
        pairs = sum(len(np.load(p, mmap_mode="r")) for p in (work / "ours" / "pairs").glob("*/*.npy"))
        return {"pairs": int(pairs)}

    def ours_cluster():
        (step,), n = middle[1]
        step.run(None, 0, n)
        return {"removed": json.loads((work / "ours" / "summary.json").read_text())["to_remove"]}

    results: dict = {"docs": len(docs), "tasks": tasks}
    for name, fn, setup in [
        ("datatrove_signature", dt_signature, dt_warmup),
        ("datatrove_buckets", dt_buckets, None),
        ("datatrove_cluster", dt_cluster, None),
        ("ours_signature", ours_signature, None),
        ("ours_buckets", ours_buckets, None),
        ("ours_cluster", ours_cluster, None),
    ]:
        r = _in_child(fn, setup)
        r["docs_per_s"] = len(docs) / r["seconds"] if r["seconds"] > 0 else float("inf")
        results[name] = r
    dt_total = results["datatrove_signature"]["seconds"] + results["datatrove_buckets"]["seconds"]
    ours_total = results["ours_signature"]["seconds"] + results["ours_buckets"]["seconds"]
    results["speedup_signature"] = results["datatrove_signature"]["seconds"] / results["ours_signature"]["seconds"]
    results["speedup_buckets"] = results["datatrove_buckets"]["seconds"] / results["ours_buckets"]["seconds"]
    results["speedup_signature_plus_buckets"] = dt_total / ours_total
    results["speedup_cluster"] = results["datatrove_cluster"]["seconds"] / results["ours_cluster"]["seconds"]
    return results


def compare_buckets_synthetic(n_docs: int, workdir: str, tasks: int = 1, dup_fraction: float = 0.1, seed: int = 0):
    """Bucket + clustering stages only, at a scale where the signature stage would take hours with datatrove.

    Writes the same synthetic band signatures in datatrove's format (sorted ``.minhash.sig`` records per bucket
    and rank) and in ours (one uint64 band hash per doc), with ``dup_fraction`` of the documents copying 1+
    bands (each band with probability 0.6) from an earlier original. Ours runs without verification here (there
    are no full signatures), which is also what datatrove does.
    """
    from datatrove.pipeline.dedup.minhash import MinhashConfig as DatatroveMinhashConfig
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster

    from kiln.data_pipeline.dedup import DedupConfig, MinhashConfig, MinHasher, find_duplicate_stages
    from kiln.data_pipeline.dedup.storage import RankSignatureWriter

    work = Path(workdir)
    buckets, rows = 14, 8
    dt_cfg = DatatroveMinhashConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=rows)
    ours_cfg = DedupConfig(exact=False, url=False, minhash=MinhashConfig(verify_threshold=None))
    rng = np.random.default_rng(seed)
    offsets = np.linspace(0, n_docs, tasks + 1).astype(np.int64)
    n_dup = int(n_docs * dup_fraction)
    dups = rng.choice(np.arange(1, n_docs), size=n_dup, replace=False)
    is_dup = np.zeros(n_docs, dtype=bool)
    is_dup[dups] = True
    originals = np.flatnonzero(~is_dup)
    sources = originals[(rng.random(n_dup) * np.searchsorted(originals, dups)).astype(np.int64)]
    forced = rng.integers(0, buckets, size=n_dup)
    folder = MinHasher(MinhashConfig(buckets=1, hashes_per_bucket=rows))
    ours_bands = np.empty((buckets, n_docs), dtype=np.uint64)
    dtype = np.dtype([(f"h{i}", "<u8") for i in range(rows)] + [("doc", "<u4")])
    for b in range(buckets):
        vals = np.random.default_rng([seed, b]).integers(0, 1 << 61, size=(n_docs, rows), dtype=np.uint64)
        copy = (rng.random(n_dup) < 0.6) | (forced == b)
        vals[dups[copy]] = vals[sources[copy]]
        ours_bands[b] = folder.band_hashes(vals, np.ones(n_docs, dtype=bool))[:, 0]
        for r in range(tasks):
            lo, hi = offsets[r], offsets[r + 1]
            rec = np.empty(hi - lo, dtype=dtype)
            for i in range(rows):
                rec[f"h{i}"] = vals[lo:hi, i]
            rec["doc"] = np.arange(hi - lo)
            rec.sort(order=dtype.names)
            path = work / "dt" / "sigs" / f"bucket_{b:03d}" / f"{r:05d}.minhash.sig"
            path.parent.mkdir(parents=True, exist_ok=True)
            rec.tofile(path)
        del vals
    for r in range(tasks):
        lo, hi = offsets[r], offsets[r + 1]
        writer = RankSignatureWriter(work / "ours", r, ours_cfg)
        writer.append({f"band_{b:03d}": ours_bands[b, lo:hi] for b in range(buckets)}, np.zeros((hi - lo, 0)))
        writer.commit()
    del ours_bands
    middle = find_duplicate_stages(ours_cfg, work / "ours", num_input_tasks=tasks)

    def dt_buckets():
        step = MinhashDedupBuckets(
            input_folder=str(work / "dt" / "sigs"), output_folder=str(work / "dt" / "buckets"), config=dt_cfg
        )
        for bucket in range(buckets):
            step.run(None, bucket, buckets)
        return {"pairs": int(sum(p.stat().st_size // 16 for p in (work / "dt" / "buckets").glob("*.dups")))}

    def dt_cluster():
        step = MinhashDedupCluster(
            input_folder=str(work / "dt" / "buckets"), output_folder=str(work / "dt" / "remove"), config=dt_cfg
        )
        step.run(None, 0, 1)
        return {"removed": int(sum(p.stat().st_size // 4 for p in (work / "dt" / "remove").glob("*.remove")))}

    def ours_buckets():
        (step,), n = middle[0]
        for rank in range(n):
            step.run(None, rank, n)
        return {"pairs": int(sum(len(np.load(p, mmap_mode="r")) for p in (work / "ours" / "pairs").glob("*/*.npy")))}

    def ours_cluster():
        (step,), n = middle[1]
        step.run(None, 0, n)
        return {"removed": json.loads((work / "ours" / "summary.json").read_text())["to_remove"]}

    results: dict = {"docs": n_docs, "tasks": tasks, "duplicates_planted": n_dup}
    for name, fn in [
        ("datatrove_buckets", dt_buckets),
        ("datatrove_cluster", dt_cluster),
        ("ours_buckets", ours_buckets),
        ("ours_cluster", ours_cluster),
    ]:
        r = _in_child(fn)
        r["docs_per_s"] = n_docs / r["seconds"] if r["seconds"] > 0 else float("inf")
        results[name] = r
    results["speedup_buckets"] = results["datatrove_buckets"]["seconds"] / results["ours_buckets"]["seconds"]
    results["speedup_cluster"] = results["datatrove_cluster"]["seconds"] / results["ours_cluster"]["seconds"]
    return results


def load_docs(path: Path, max_docs: int, copies: int, mutate: float, seed: int = 0) -> list[Document]:
    """Documents from a JSONL file (``text``, optional ``id``/``url``) plus ``copies`` near-copies of each."""
    rng = random.Random(seed)
    docs = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i >= max_docs:
                break
            rec = json.loads(line)
            meta = {"url": rec["url"]} if rec.get("url") else {}
            docs.append(Document(text=rec["text"], id=str(rec.get("id", i)), metadata=meta))
    originals = list(docs)
    for c in range(copies):
        for doc in originals:
            words = doc.text.split()
            for p in rng.sample(range(len(words)), int(len(words) * mutate)):
                words[p] = "".join(rng.choices(string.ascii_lowercase, k=7))
            docs.append(Document(text=" ".join(words), id=f"{doc.id}-copy{c}", metadata=dict(doc.metadata)))
    rng.shuffle(docs)
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="JSONL with a 'text' field")
    parser.add_argument("--max-docs", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=1, help="near-copies added per document")
    parser.add_argument("--mutate", type=float, default=0.01, help="fraction of words replaced in each copy")
    parser.add_argument("--tasks", type=int, default=1, help="input ranks (run one after the other)")
    parser.add_argument("--workdir", type=str, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--synthetic", type=int, default=0, help="instead: bucket + cluster stages on N synthetic signatures"
    )
    parser.add_argument("--dup-fraction", type=float, default=0.1, help="with --synthetic")
    args = parser.parse_args()
    if args.synthetic:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            results = compare_buckets_synthetic(args.synthetic, tmp, args.tasks, args.dup_fraction)
        _print(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    if not args.input.exists():
        sys.exit(f"input not found: {args.input} (pass --input)")
    docs = load_docs(args.input, args.max_docs, args.copies, args.mutate)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = compare_minhash(docs, tmp, tasks=args.tasks)
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _print(results: dict) -> None:
    print(f"{results['docs']} docs, {results['tasks']} input task(s)")
    print(f"{'stage':<22}{'seconds':>9}{'docs/s':>10}{'peak RSS MiB':>14}{'extra RSS MiB':>15}  result")
    for name in [k for k, v in results.items() if isinstance(v, dict)]:
        r = results[name]
        res = ", ".join(f"{k}={r[k]}" for k in ("pairs", "removed") if k in r)
        print(
            f"{name:<22}{r['seconds']:>9.2f}{r['docs_per_s']:>10.0f}{r['peak_rss_mib']:>14.0f}"
            f"{r['extra_rss_mib']:>15.0f}  {res}"
        )
    for k in [k for k in results if k.startswith("speedup_")]:
        print(f"{k}: {results[k]:.1f}x")


if __name__ == "__main__":
    main()
