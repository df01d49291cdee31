"""Dedup: exact / URL / MinHash-LSH steps run end to end with datatrove's LocalPipelineExecutor."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.text import simplify_text

from kiln.config import ConfigError, build_dataclass
from kiln.data_pipeline.dedup import (
    DedupConfig,
    DedupFilter,
    DedupSignatures,
    MinhashConfig,
    find_duplicate_stages,
    normalize_url,
    union_find,
)

from conftest import shared_file

TASKS = 2


def write_inputs(root: Path, ranks: list[list[dict]]) -> Path:
    """One JSONL file per rank: with tasks == number of files, datatrove's reader gives file r to rank r."""
    folder = root / "input"
    folder.mkdir(parents=True)
    for r, records in enumerate(ranks):
        with open(folder / f"part_{r:02d}.jsonl", "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return folder


def read_jsonl_folder(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().split("\n") if line]
    return out


def merged_stats(logging_dir: Path) -> dict[str, int]:
    """Sum of every step's counters in the executor's stats.json: {"dropped_url_duplicate": 3, ...}."""
    totals: dict[str, int] = {}
    for step in json.loads((logging_dir / "stats.json").read_text()):
        for name, value in step["stats"].items():
            total = value["total"] if isinstance(value, dict) else value
            totals[name] = totals.get(name, 0) + total
    return totals


def run_dedup(root: Path, input_folder: Path, cfg: DedupConfig, tasks: int = TASKS) -> dict:
    work = root / "work"
    LocalPipelineExecutor(
        [JsonlReader(str(input_folder)), DedupSignatures(cfg, work)],
        tasks=tasks,
        workers=1,
        logging_dir=str(root / "logs" / "sig"),
    ).run()
    for i, (pipeline, n) in enumerate(find_duplicate_stages(cfg, work, num_input_tasks=tasks)):
        LocalPipelineExecutor(pipeline, tasks=n, workers=1, logging_dir=str(root / "logs" / f"mid{i}")).run()
    LocalPipelineExecutor(
        [
            JsonlReader(str(input_folder)),
            DedupFilter(cfg, work, exclusion_writer=JsonlWriter(str(root / "removed"), compression=None)),
            JsonlWriter(str(root / "kept"), compression=None),
        ],
        tasks=tasks,
        workers=1,
        logging_dir=str(root / "logs" / "filter"),
    ).run()
    return {
        "kept": read_jsonl_folder(root / "kept"),
        "removed": read_jsonl_folder(root / "removed"),
        "stats": merged_stats(root / "logs" / "filter"),
        "work": work,
    }


# ----------------------------------------------------------------------------------------------------------------
# exact + URL


EXACT_URL_RANKS = [
    [
        {"id": "a0", "text": "Hello world. This is doc A", "url": "https://example.com/page"},
        {"id": "a1", "text": "  hello   WORLD. \n this is doc a ", "url": "http://other.com/x"},  # exact of a0
        {"id": "a2", "text": "unique text two", "url": "http://www.example.com/page/"},  # url of a0
        {"id": "a3", "text": "different content three", "url": "https://example.com/page#section"},  # url of a0
        {"id": "a4", "text": "another unique one"},  # no url
        {"id": "a5", "text": "Hello world. This is doc A", "url": "https://EXAMPLE.com/page"},  # exact + url
    ],
    [
        {"id": "b0", "text": "Another unique one", "url": "https://b.org/1"},  # exact of a4
        {"id": "b1", "text": "unique text b1", "url": "https://b.org/1/"},  # url of b0 -> cluster of a4
        {"id": "b2", "text": "Distinct words", "url": "https://example.com/Page"},  # path case differs: kept
        {"id": "b3", "text": "query differs", "url": "https://example.com/page?q=1"},  # query kept: kept
        {"id": "b4", "text": "Hello world, this is doc A", "url": "https://c.org/"},  # punctuation differs: kept
        {"id": "b5", "text": "x", "url": "https://www.b.org:443/1"},  # url of b0 (default port)
    ],
]
EXPECTED_DROPS = {
    "a1": ("exact_duplicate", [0, 0]),
    "a5": ("exact_duplicate", [0, 0]),
    "b0": ("exact_duplicate", [0, 4]),
    "a2": ("url_duplicate", [0, 0]),
    "a3": ("url_duplicate", [0, 0]),
    "b1": ("url_duplicate", [0, 4]),
    "b5": ("url_duplicate", [0, 4]),
}


def test_normalize_url():
    assert normalize_url("https://www.Example.com:443/a/b/?q=1#frag") == "example.com/a/b?q=1"
    assert normalize_url("http://example.com/a/b") == normalize_url("example.com/a/b/")
    assert normalize_url("https://example.com:8080/") == "example.com:8080"
    assert normalize_url("https://example.com/x?q=1", drop_query=True) == "example.com/x"


@pytest.mark.parametrize("minhash", [False, True])
def test_exact_and_url_dedup(tmp_path, minhash):
    cfg = DedupConfig(minhash=MinhashConfig() if minhash else None)
    out = run_dedup(tmp_path, write_inputs(tmp_path, EXACT_URL_RANKS), cfg)
    expected = dict(EXPECTED_DROPS)
    if minhash:  # punctuation is normalised away before shingling: b4 is a MinHash duplicate of a0
        expected["b4"] = ("minhash_duplicate", [0, 0])
    got = {d["id"]: (d["metadata"]["filter_reason"], d["metadata"]["duplicate_of"]) for d in out["removed"]}
    assert got == expected
    assert sorted(d["id"] for d in out["kept"]) == sorted({"a0", "a4", "b2", "b3", "b4"} - set(expected))
    stats = out["stats"]
    assert stats["dropped_exact_duplicate"] == 3  # a1, a5 (also a URL duplicate: exact wins), b0
    assert stats["dropped_url_duplicate"] == 4
    assert stats.get("dropped_minhash_duplicate", 0) == (1 if minhash else 0)
    assert stats["dropped"] == len(expected) and stats["forwarded"] == 12 - len(expected)
    summary = json.loads((out["work"] / "summary.json").read_text())
    assert summary["to_remove"] == len(expected) and summary["clusters"] == 2


def test_config_validation():
    cfg = build_dataclass(DedupConfig, {"url": False, "minhash": {"buckets": 20, "hashes_per_bucket": 5}})
    assert cfg.minhash.num_hashes == 100 and not cfg.url
    assert build_dataclass(DedupConfig, {"minhash": None}).minhash is None
    with pytest.raises(ConfigError, match="hashes_per_bucket"):
        build_dataclass(DedupConfig, {"minhash": {"hashes_per_bucket": 0}})
    with pytest.raises(ConfigError, match="verify_threshold"):
        build_dataclass(DedupConfig, {"minhash": {"verify_threshold": 1.5}})
    with pytest.raises(ConfigError, match="at least one"):
        build_dataclass(DedupConfig, {"exact": False, "url": False, "minhash": None})


def test_union_find_matches_python():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 3000, size=2500)
    v = rng.integers(0, 3000, size=2500)
    nodes, labels = union_find(u, v)
    parent: dict[int, int] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    assert nodes.tolist() == sorted(parent)
    assert labels.tolist() == [find(x) for x in nodes.tolist()]  # root = smallest member (min-hooking)
    # a long path in shuffled order converges too
    perm = rng.permutation(10_000)
    nodes, labels = union_find(perm[:-1], perm[1:])
    assert len(nodes) == 10_000 and (labels == 0).all()


def test_filter_refuses_misaligned_input(tmp_path):
    cfg = DedupConfig(minhash=None)
    inp = write_inputs(tmp_path, EXACT_URL_RANKS)
    run_dedup(tmp_path, inp, cfg)
    short = write_inputs(tmp_path / "short", [EXACT_URL_RANKS[0][:4], EXACT_URL_RANKS[1]])
    step = DedupFilter(cfg, tmp_path / "work")
    docs = list(JsonlReader(str(short))(None, rank=0, world_size=2))
    with pytest.raises(ValueError, match="saw 4 documents but DedupSignatures saw 6"):
        list(step.run(iter(docs), rank=0, world_size=2))


def test_hash_range_slices_give_same_result(tmp_path):
    """workers_per_bucket=3 (each task holds a third of a key's hashes) finds exactly the same drops."""
    ranks = [[dict(r) for r in rank] for rank in EXACT_URL_RANKS]
    results = []
    for workers in (1, 3):
        cfg = DedupConfig(minhash=MinhashConfig(workers_per_bucket=workers))
        out = run_dedup(tmp_path / f"w{workers}", write_inputs(tmp_path / f"w{workers}", ranks), cfg)
        results.append(sorted((d["id"], d["metadata"]["filter_reason"]) for d in out["removed"]))
        assert len(list((out["work"] / "pairs" / "band_000").glob("*.npy"))) == workers
    assert results[0] == results[1] and len(results[0]) == 8


# ----------------------------------------------------------------------------------------------------------------
# MinHash quality on real web text with planted near-duplicates


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Ground truth: word 5-grams of datatrove's simplify_text (lowercase, no punctuation, numbers -> 0)."""
    words = simplify_text(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def plant_variant(text: str, target: float, rng: random.Random) -> tuple[str, float]:
    """Replace the fewest random words by fresh tokens so that the 5-gram Jaccard to ``text`` is ~target."""
    words = simplify_text(text).split()
    base = shingle_set(text)
    order = list(range(len(words)))
    rng.shuffle(order)
    fresh = ["".join(rng.choices(string.ascii_lowercase, k=9)) for _ in words]

    def variant(k: int) -> list[str]:
        w = list(words)
        for p in order[:k]:
            w[p] = fresh[p]
        return w

    def j_of(k: int) -> float:  # the search works on normalised words; the returned J is recomputed from text
        w = variant(k)
        return jaccard(base, {tuple(w[i : i + 5]) for i in range(len(w) - 4)})

    lo, hi = 0, len(words)  # J(k) is non-increasing in k: find the first k with J(k) <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if j_of(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    k = min((c for c in (lo - 1, lo) if c >= 0), key=lambda c: abs(j_of(c) - target))
    text2 = " ".join(variant(k))
    return text2, jaccard(base, shingle_set(text2))


LEVELS = (0.5, 0.6, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
PAIRS_PER_LEVEL = 32
MAX_WORDS = 400
JUDGE_THRESHOLD = 0.7  # ~ (1/14)**(1/8) = 0.719, the S-curve midpoint of 14 x 8 LSH (datatrove's comment)


def build_planted_corpus(rng: random.Random) -> tuple[list[list[dict]], list[tuple[str, str, float]]]:
    path = shared_file("web/wceb_modern_1000_url_text.jsonl")
    records = [json.loads(line) for line in path.read_text().split("\n") if line]
    # the first MAX_WORDS words of each page (whitespace-joined, punctuation and case kept) keep the exact set
    # arithmetic of the ground truth fast; 400 words still give ~400 shingles per document
    docs = [
        {"id": r["id"], "text": " ".join(r["text"].split()[:MAX_WORDS])}
        for r in records
        if len(r["text"].split()) >= 150
    ]
    bases = rng.sample(range(len(docs)), len(LEVELS) * PAIRS_PER_LEVEL)
    planted = []
    for i, b in enumerate(bases):
        target = LEVELS[i // PAIRS_PER_LEVEL]
        text, true_j = plant_variant(docs[b]["text"], target, rng)
        vid = f"{docs[b]['id']}-v{target}"
        docs.append({"id": vid, "text": text})
        planted.append((docs[b]["id"], vid, true_j))
    rng.shuffle(docs)
    half = len(docs) // 2
    return [docs[:half], docs[half:]], planted


def test_minhash_quality_planted_near_duplicates(tmp_path):
    rng = random.Random(1234)
    ranks, planted = build_planted_corpus(rng)
    by_pos = {(r, i): d for r, rank in enumerate(ranks) for i, d in enumerate(rank)}
    by_gid = [d for rank in ranks for d in rank]
    shingles = {d["id"]: shingle_set(d["text"]) for d in by_gid}
    cfg = DedupConfig(exact=False, url=False)  # MinHash only, default 14 x 8, 5-grams, verify at 0.7
    out = run_dedup(tmp_path, write_inputs(tmp_path, ranks), cfg)

    cluster = {d["id"]: d["id"] for d in out["kept"]}
    for d in out["removed"]:
        assert d["metadata"]["filter_reason"] == "minhash_duplicate"
        cluster[d["id"]] = by_pos[tuple(d["metadata"]["duplicate_of"])]["id"]
    assert len(cluster) == len(by_gid)

    def detected_pairs(work: Path) -> set[tuple[int, int]]:
        pairs = [np.load(p) for p in sorted((work / "pairs").glob("band_*/*.npy"))]
        return {tuple(sorted(p)) for p in np.concatenate(pairs).tolist()}

    def precision(pairs: set[tuple[int, int]]) -> float:
        js = [jaccard(shingles[by_gid[a]["id"]], shingles[by_gid[b]["id"]]) for a, b in pairs]
        return float(np.mean([j >= JUDGE_THRESHOLD for j in js])) if js else 1.0

    found = np.array([cluster[a] == cluster[b] for a, b, _ in planted])
    true_j = np.array([j for _, _, j in planted])
    recall_08 = found[true_j >= 0.8].mean()
    verified_pairs = detected_pairs(out["work"])
    pair_precision = precision(verified_pairs)
    drop_precision = np.mean(
        [jaccard(shingles[d["id"]], shingles[cluster[d["id"]]]) >= JUDGE_THRESHOLD for d in out["removed"]]
    )

    # the same signatures through plain LSH (no verification), for comparison
    lsh_cfg = DedupConfig(exact=False, url=False, minhash=MinhashConfig(verify_threshold=None))
    for i, (pipeline, n) in enumerate(find_duplicate_stages(lsh_cfg, out["work"], num_input_tasks=TASKS)):
        LocalPipelineExecutor(pipeline, tasks=n, workers=1, logging_dir=str(tmp_path / "logs" / f"lsh{i}")).run()
    lsh_pairs = detected_pairs(out["work"])
    lsh_found = np.array([tuple(sorted(_gid_pair(by_gid, a, b))) in lsh_pairs for a, b, _ in planted])

    print(f"\nplanted pairs: {len(planted)}, corpus {len(by_gid)} docs")
    for level in LEVELS:
        sel = np.isclose([round(j, 2) for j in true_j], level, atol=0.02)
        if sel.any():
            print(
                f"  J~{level:.2f}: n={sel.sum():3d} true J {true_j[sel].min():.3f}-{true_j[sel].max():.3f} "
                f"found {found[sel].mean():.3f} (LSH alone {lsh_found[sel].mean():.3f}; "
                f"theory LSH {1 - (1 - level**8) ** 14:.3f})"
            )
    print(f"recall (true J >= 0.8): {recall_08:.3f}  (LSH alone {lsh_found[true_j >= 0.8].mean():.3f})")
    print(f"pair precision (true J >= {JUDGE_THRESHOLD}): {pair_precision:.3f} over {len(verified_pairs)} pairs")
    print(f"LSH-alone pair precision: {precision(lsh_pairs):.3f} over {len(lsh_pairs)} pairs")
    print(f"drop precision (J(dropped, kept) >= {JUDGE_THRESHOLD}): {drop_precision:.3f} over {len(out['removed'])}")

    assert abs(true_j[true_j >= 0.79].mean() - 0.9) < 0.02  # planted levels hit their targets
    assert recall_08 >= 0.95
    assert pair_precision >= 0.98
    assert drop_precision >= 0.98
    assert found[true_j < 0.55].mean() <= 0.05  # J = 0.5 pairs are (almost) never merged


def _gid_pair(by_gid: list[dict], id_a: str, id_b: str) -> tuple[int, int]:
    gid = {d["id"]: g for g, d in enumerate(by_gid)}
    return gid[id_a], gid[id_b]


# ----------------------------------------------------------------------------------------------------------------
# same duplicates as datatrove's MinHash pipeline


def test_same_duplicates_as_datatrove(tmp_path):
    from datatrove.pipeline.dedup.minhash import MinhashConfig as DatatroveMinhashConfig
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature

    rng = random.Random(7)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)]
    originals = [" ".join(rng.choices(vocab, k=rng.randint(80, 300))) for _ in range(60)]
    docs = [{"id": f"o{i}", "text": t} for i, t in enumerate(originals)]
    for i in range(15):  # same shingles after normalisation: case and punctuation differ
        words = originals[i].split()
        docs.append({"id": f"same{i}", "text": ". ".join(w.capitalize() for w in words) + "!"})
    for i in range(15, 30):  # near copies, 5-gram Jaccard ~0.95
        docs.append({"id": f"near{i}", "text": plant_variant(originals[i], 0.95, rng)[0]})
    for i in range(30, 45):  # related but far below the LSH threshold
        docs.append({"id": f"far{i}", "text": plant_variant(originals[i], 0.3, rng)[0]})
    rng.shuffle(docs)
    ranks = [docs[:50], docs[50:]]
    inp = write_inputs(tmp_path, ranks)

    dt_cfg = DatatroveMinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    dt = tmp_path / "datatrove"
    LocalPipelineExecutor(
        [JsonlReader(str(inp)), MinhashDedupSignature(output_folder=str(dt / "sigs"), config=dt_cfg)],
        tasks=TASKS,
        workers=1,
        logging_dir=str(dt / "logs1"),
    ).run()
    LocalPipelineExecutor(
        [MinhashDedupBuckets(input_folder=str(dt / "sigs"), output_folder=str(dt / "buckets"), config=dt_cfg)],
        tasks=14,
        workers=1,
        logging_dir=str(dt / "logs2"),
    ).run()
    LocalPipelineExecutor(
        [MinhashDedupCluster(input_folder=str(dt / "buckets"), output_folder=str(dt / "remove"), config=dt_cfg)],
        tasks=1,
        workers=1,
        logging_dir=str(dt / "logs3"),
    ).run()
    dt_removed = {
        (r, int(i)) for r in range(TASKS) for i in np.fromfile(dt / "remove" / f"{r:06d}.remove", dtype="<u4")
    }

    pos = {d["id"]: (r, i) for r, rank in enumerate(ranks) for i, d in enumerate(rank)}
    # each (original, copy) pair loses its later document, in (rank, index) order
    expected = {max(pos[f"o{i}"], pos[f"{'same' if i < 15 else 'near'}{i}"]) for i in range(30)}
    assert len(expected) == 30
    assert dt_removed == expected
    for verify in (0.7, None):
        cfg = DedupConfig(exact=False, url=False, minhash=MinhashConfig(verify_threshold=verify))
        work = tmp_path / f"ours-{verify}"
        LocalPipelineExecutor(
            [JsonlReader(str(inp)), DedupSignatures(cfg, work)],
            tasks=TASKS,
            workers=1,
            logging_dir=str(work / "logs"),
        ).run()
        for i, (pipeline, n) in enumerate(find_duplicate_stages(cfg, work, num_input_tasks=TASKS)):
            LocalPipelineExecutor(pipeline, tasks=n, workers=1, logging_dir=str(work / f"logs{i}")).run()
        ours = {(r, int(i)) for r in range(TASKS) for i in np.load(work / "remove" / f"{r:05d}.npy")["index"]}
        assert ours == dt_removed
