"""Decontamination (data_pipeline/decontaminate): planted eval-set n-grams are found exactly, both policies are
checked document by document, per-set overlap counts are exact, bad eval sets fail before any work, and a
`kiln data run` with the step balances its books (one document in, N pieces out)."""

from __future__ import annotations

import gzip
import itertools
import json
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datatrove.data import Document

from kiln.cli import main
from kiln.config import ConfigError, load_config
from kiln.data_pipeline.accounting import build_report
from kiln.data_pipeline.decontaminate import DecontaminateConfig, EvalSetConfig
from kiln.data_pipeline.decontaminate.index import BYTES_PER_NGRAM, EvalIndex, normalized_words, word_spans
from kiln.data_pipeline.decontaminate.step import DecontaminateStep, build_decontaminate
from kiln.data_pipeline.decontaminate.summary import load_summary, merge_overlap, overlap_path
from kiln.data_pipeline.filters import FILTER_CONFIGS, build_filter
from kiln.data_pipeline.recipe import DataRecipe
from kiln.data_pipeline.runner import iter_output

from conftest import shared_file

N = 13
MARGIN = MIN_PIECE = 200
MAX_PIECES = 10


# -- independent expectations ------------------------------------------------------------------------------------


def expected_outcome(text: str, spans: list[tuple[int, int]]) -> list[str] | str:
    """What the split policy must do to ``text`` whose contaminated spans are ``spans``, computed character by
    character (no interval logic shared with the step): the kept pieces' texts, or the drop reason."""
    removed = [False] * len(text)
    for s, e in spans:
        for i in range(max(0, s - MARGIN), min(len(text), e + MARGIN)):
            removed[i] = True
    segments, pos = [], 0
    for is_removed, run in itertools.groupby(removed):
        n = len(list(run))
        if not is_removed:
            segments.append(text[pos : pos + n])
        pos += n
    pieces = [s for s in segments if s.strip()]
    if len(pieces) > MAX_PIECES:
        return "contaminated_too_many_pieces"
    kept = [p for p in pieces if len(p) >= MIN_PIECE]
    return kept or "contaminated"


class ListWriter:
    """Stands in for a datatrove DiskWriter: collects the excluded documents."""

    def __init__(self):
        self.docs: list[Document] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, doc, rank=0):
        self.docs.append(doc)


def run_step(step: DecontaminateStep, docs: list[Document], rank: int = 0, world_size: int = 1):
    writer = ListWriter()
    step.exclusion_writer = writer
    originals = {d.id: (d.text, dict(d.metadata)) for d in docs}
    out = list(
        step.run(iter([Document(text=t, id=i, metadata=dict(m)) for i, (t, m) in originals.items()]), rank, world_size)
    )
    return out, {d.id: d.metadata["filter_reason"] for d in writer.docs}


def stats(step: DecontaminateStep) -> dict[str, float]:
    return {k: (v.total if hasattr(v, "total") else v) for k, v in step.stats.stats.items()}


# -- synthetic corpus with planted spans ---------------------------------------------------------------------------


@dataclass
class Corpus:
    eval_sets: list[dict]  # {path, text_key, name}
    docs: list[Document]
    spans: dict[str, list[tuple[int, int]]]  # doc id -> planted [start, end) character spans
    sources: dict[str, set[tuple[str, int]]]  # doc id -> {(set name, item index)} planted in it
    items: dict[str, dict[int, list[str]]]  # set -> item index -> its words
    expected_sets: dict[str, dict] = field(default_factory=dict)  # set -> items / items_too_short


def _vocab(rng: random.Random, n: int = 20_000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _eval_surface(words: list[str], rng: random.Random) -> str:
    """How an eval item is written: capitalised, with commas and a question mark (normalised away)."""
    out = []
    for i, w in enumerate(words):
        w = w.capitalize() if i == 0 or rng.random() < 0.1 else w
        out.append(w + ("," if rng.random() < 0.1 else ""))
    return " ".join(out) + "?"


def _train_surface(words: list[str], rng: random.Random) -> str:
    """How a planted span is written in a training document: other case and punctuation, standalone dashes and
    line breaks between words; the same normalised words. Starts and ends with a word token."""
    out = []
    for i, w in enumerate(words):
        token = {0: w.upper(), 1: f'"{w}"', 2: f"{w}.", 3: f"({w.title()})"}[rng.randrange(4)]
        out.append(token)
        if 0 < i < len(words) - 1 and rng.random() < 0.1:
            out.append(rng.choice(["--", "—", "…"]))
    seps = [rng.choice([" ", " ", "\n", "  "]) for _ in out]
    return "".join(t + s for t, s in zip(out, seps)).rstrip()


def make_eval_sets(folder: Path, rng: random.Random, vocab: list[str]) -> tuple[list[dict], dict, dict]:
    """Three eval sets in three formats, each with items too short to index and (JSONL, text) a blank line."""
    items: dict[str, dict[int, list[str]]] = {"qa": {}, "para": {}, "lines": {}}
    # qa: JSONL.gz, text under "question"; line 5 is blank, so the items are 0-4 and 6-11; items 8 and 9 (8 and
    # 12 words) are too short for 13-grams
    lengths = [30, 25, 40, 28, 33, 26, 35, 8, 12, 31, 29]
    index = 0
    with gzip.open(folder / "qa.jsonl.gz", "wt") as f:
        for k, n in enumerate(lengths):
            if index == 5:
                f.write("\n")
                index += 1
            words = rng.choices(vocab, k=n)
            items["qa"][index] = words
            f.write(json.dumps({"id": f"q{k}", "question": _eval_surface(words, rng), "answer": "A"}) + "\n")
            index += 1
    # para: Parquet, column "text"
    para = [rng.choices(vocab, k=n) for n in (45, 38, 50, 41, 5, 36, 44, 39)]
    items["para"] = dict(enumerate(para))
    pq.write_table(pa.table({"text": [_eval_surface(w, rng) for w in para]}), folder / "para.parquet")
    # lines: plain text, one item per line; line 3 is blank, line 6 too short
    lines = (
        [rng.choices(vocab, k=n) for n in (22, 27, 24)] + [None] + [rng.choices(vocab, k=n) for n in (26, 30, 4, 25)]
    )
    with open(folder / "lines.txt", "w") as f:
        for i, words in enumerate(lines):
            f.write("\n" if words is None else _eval_surface(words, rng) + "\n")
            if words is not None:
                items["lines"][i] = words
    sets = [
        {"path": str(folder / "qa.jsonl.gz"), "text_key": "question", "name": "qa"},
        {"path": str(folder / "para.parquet")},  # name from the file: "para"; text_key defaults to "text"
        {"path": str(folder / "lines.txt")},
    ]
    expected = {
        "qa": {"items": 11, "items_too_short": 2},
        "para": {"items": 8, "items_too_short": 1},
        "lines": {"items": 7, "items_too_short": 1},
    }
    return sets, items, expected


# Plans: doc number -> [(set, item, first word, length, where)], where = fraction of the filler before the span
# (spans are spread in that order). Every other document (and the near misses below) is clean.
PLANS: dict[int, list[tuple[str, int, int, int, float]]] = {
    1: [("qa", 0, 3, 13, 0.5)],  # one 13-gram in the middle: 2 pieces
    3: [("para", 2, 10, 30, 0.4)],  # 30 words (18 n-grams): one span
    5: [("qa", 3, 0, 13, 0.2), ("lines", 1, 5, 15, 0.8)],  # two sets, far apart: 3 pieces
    7: [("qa", 4, 2, 14, 0.5), ("qa", 6, 0, 13, 0.52)],  # close together: the cuts merge
    9: [("lines", 4, 0, 20, 0.0)],  # at the very start: no piece before it
    11: [("para", 5, 20, 16, 1.0)],  # at the very end
    13: [("qa", 11, 1, 13, 0.5)],  # short document: every piece < 200 chars -> dropped "contaminated"
    # 11 spans, 12 pieces -> dropped "contaminated_too_many_pieces"
    15: [(s, i, 0, 13, k / 12) for k, (s, i) in enumerate([("para", j) for j in (0, 1, 3, 6, 7)] * 2 + [("qa", 2)], 1)],
    # 9 spans, 10 pieces (the most allowed) -> kept
    17: [(s, i, 2, 13, k / 10) for k, (s, i) in enumerate([("lines", 0), ("lines", 5), ("lines", 7)] * 3, 1)],
    19: [("qa", 10, 0, 29, 0.3), ("qa", 10, 0, 13, 0.7)],  # the same item twice: one item, one document
    21: [("para", 7, 5, 13, 0.5)],
}
SIZES = {13: 60, 15: 1400, 17: 1150}  # filler words (default 450): 13 is short, 15 and 17 hold many spans


def make_corpus(folder: Path, seed: int = 0, n_docs: int = 40) -> Corpus:
    rng = random.Random(seed)
    vocab = _vocab(rng)
    sets, items, expected = make_eval_sets(folder, rng, vocab)
    docs, spans, sources = [], {}, {}
    for d in range(n_docs):
        doc_id = f"doc{d:03d}"
        filler = rng.choices(vocab, k=SIZES.get(d, 450))
        plan = PLANS.get(d, [])
        parts: list[tuple[str, bool]] = []  # (text, is a planted span), joined by whitespace
        prev = 0
        for p, k in sorted((round(where * len(filler)), k) for k, (*_, where) in enumerate(plan)):
            if p > prev:
                parts.append((" ".join(filler[prev:p]), False))
            set_name, item, first, length, _ = plan[k]
            parts.append((_train_surface(items[set_name][item][first : first + length], rng), True))
            prev = p
        if prev < len(filler):
            parts.append((" ".join(filler[prev:]), False))
        text, doc_spans = "", []
        for i, (part, is_span) in enumerate(parts):
            if i:
                text += rng.choice([" ", "\n", "\n\n"])
            if is_span:
                doc_spans.append((len(text), len(text) + len(part)))
            text += part
        if d == 23:  # near miss: 12 consecutive words of an indexed item (one short of a 13-gram)
            text += " " + " ".join(items["qa"][0][5:17])
        if d == 25:  # near miss: 13 words with the middle one changed
            words = list(items["para"][1][:13])
            words[6] = "zzzzzz"
            text += " " + " ".join(words)
        if d == 27:  # near miss: all the words of items too short to index (8 and 12 words)
            text += " " + " ".join(items["qa"][8]) + "\n" + " ".join(items["qa"][9])
        if d == 29:  # near miss: 13 words of an item, two of them joined by a hyphen ("a-b" -> "ab": 12 words)
            w = items["lines"][2][:13]
            text += " " + " ".join(w[:6]) + " " + w[6] + "-" + w[7] + " " + " ".join(w[8:])
        docs.append(Document(text=text, id=doc_id, metadata={"url": f"https://example.com/{d}", "n": d}))
        if doc_spans:
            spans[doc_id] = doc_spans
            sources[doc_id] = {(s, i) for s, i, *_ in plan}
    return Corpus(sets, docs, spans, sources, items, expected)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("evals"))


def expected_counts(corpus: Corpus) -> dict[str, dict]:
    out = {}
    for name, base in corpus.expected_sets.items():
        docs = {d for d, src in corpus.sources.items() if any(s == name for s, _ in src)}
        dirty = sorted({i for src in corpus.sources.values() for s, i in src if s == name})
        indexed = base["items"] - base["items_too_short"]
        out[name] = base | {
            "indexed_items": indexed,
            "contaminated_documents": len(docs),
            "contaminated_items": len(dirty),
            "clean_items": indexed - len(dirty),
            "contaminated_item_indices": dirty,
        }
    return out


def _counts_only(summary: dict) -> dict[str, dict]:
    keys = ("items", "items_too_short", "indexed_items", "contaminated_documents", "contaminated_items")
    keys += ("clean_items", "contaminated_item_indices")
    return {name: {k: s[k] for k in keys} for name, s in summary["eval_sets"].items()}


# -- normalisation and index ---------------------------------------------------------------------------------------


def test_normalisation_is_documented_and_offsets_agree():
    assert normalized_words("The U.S. (2020) -- don't!") == ["the", "us", "2020", "dont"]
    assert normalized_words("«Ünïcode»\u00a0wörds — €5 + 3 = ©x\tTAB\nnew-line_under") == [
        "ünïcode", "wörds", "€5", "+", "3", "=", "©x", "tab", "newlineunder",
    ]  # fmt: skip
    text = "  Hello,   World!  -- (a) "
    words, starts, ends = word_spans(text)
    assert words == normalized_words(text) == ["hello", "world", "a"]
    assert [text[s:e] for s, e in zip(starts, ends)] == ["Hello,", "World!", "(a)"]


@pytest.mark.shared_data
def test_offsets_agree_with_normalisation_on_real_web_text():
    path = shared_file("web/wceb_modern_1000_url_text.jsonl")
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    for text in texts:
        words, starts, ends = word_spans(text)
        assert words == normalized_words(text)
        assert not any(c.isspace() for s, e in zip(starts, ends) for c in text[s:e])


def test_index_counts_items_memory_and_lookup(corpus, tmp_path):
    sets = [(EvalSetConfig(**s).set_name, s["path"], s.get("text_key", "text")) for s in corpus.eval_sets]
    index = EvalIndex.build(sets, N)
    info = {s.name: (s.items, s.items_too_short, s.indexed_items, s.format) for s in index.sets}
    assert info == {
        "qa": (11, 2, 9, "jsonl"),
        "para": (8, 1, 7, "parquet"),
        "lines": (7, 1, 6, "text"),
    }
    # one entry per distinct (n-gram, item): an item of k words has k - 12 n-grams (random words: all distinct)
    n_pairs = sum(len(w) - N + 1 for per_set in corpus.items.values() for w in per_set.values() if len(w) >= N)
    assert len(index.hashes) == n_pairs and index.nbytes == BYTES_PER_NGRAM * n_pairs
    assert list(index.hashes) == sorted(index.hashes)
    index.save(tmp_path / "idx")
    loaded = EvalIndex.load(tmp_path / "idx")
    assert (loaded.hashes == index.hashes).all() and (loaded.item_ids == index.item_ids).all()
    assert loaded.locate(loaded.items_of(loaded.hashes[:1])) == index.locate(index.items_of(index.hashes[:1]))


# -- the two policies, document by document ------------------------------------------------------------------------


def _step(corpus: Corpus, policy: str, work_dir=None) -> DecontaminateStep:
    return DecontaminateStep(corpus.eval_sets, ngram=N, policy=policy, work_dir=work_dir)


def test_drop_policy_drops_exactly_the_planted_documents(corpus, tmp_path):
    step = _step(corpus, "drop", tmp_path / "work")
    out, dropped = run_step(step, corpus.docs)
    assert dropped == dict.fromkeys(corpus.spans, "contaminated")
    by_id = {d.id: d for d in corpus.docs}
    assert [d.id for d in out] == [d.id for d in corpus.docs if d.id not in corpus.spans]
    for doc in out:  # byte for byte, metadata too
        assert doc.text.encode() == by_id[doc.id].text.encode() and doc.metadata == by_id[doc.id].metadata
    s = stats(step)
    assert s["total"] == len(corpus.docs) and s["forwarded"] == len(out)
    assert s["dropped"] == s["dropped_contaminated"] == len(corpus.spans)
    summary = merge_overlap([json.loads(overlap_path(tmp_path / "work", 0).read_text())])
    assert _counts_only(summary) == expected_counts(corpus)
    assert summary["contaminated_documents"] == len(corpus.spans) and summary["documents_checked"] == len(corpus.docs)


def test_split_policy_removes_exactly_the_planted_spans_and_margins(corpus):
    step = _step(corpus, "split")
    out, dropped = run_step(step, corpus.docs)
    by_id = {d.id: d for d in corpus.docs}
    pieces: dict[str, list[Document]] = {}
    for doc in out:
        parent = doc.id.split("/part")[0]
        pieces.setdefault(parent, []).append(doc)
    outcomes = {"split": 0, "pieces": 0}
    for doc in corpus.docs:
        if doc.id not in corpus.spans:  # clean (near misses included): unchanged, byte for byte
            assert [(p.id, p.text.encode(), p.metadata) for p in pieces[doc.id]] == [
                (doc.id, doc.text.encode(), doc.metadata)
            ]
            assert doc.id not in dropped
            continue
        want = expected_outcome(doc.text, corpus.spans[doc.id])
        if isinstance(want, str):
            assert dropped.get(doc.id) == want and doc.id not in pieces, doc.id
            continue
        got = pieces[doc.id]
        assert [p.id for p in got] == [f"{doc.id}/part{k}" for k in range(len(want))]
        assert [p.text for p in got] == want, doc.id
        for p in got:
            meta = p.metadata["decontaminate"]
            assert doc.text[meta["start"] : meta["end"]] == p.text and meta["parent_id"] == doc.id
            assert {key: v for key, v in p.metadata.items() if key != "decontaminate"} == by_id[doc.id].metadata
        outcomes["split"] += 1
        outcomes["pieces"] += len(got)
    # the plans cover every case: a span at the start / end, merged cuts, a short document, 12 and 10 pieces
    assert dropped == {"doc013": "contaminated", "doc015": "contaminated_too_many_pieces"}
    assert len(pieces["doc017"]) == 10 and len(pieces["doc009"]) == 1 and len(pieces["doc011"]) == 1
    assert len(pieces["doc007"]) == 2 and len(pieces["doc005"]) == 3
    s = stats(step)
    assert s["documents_split"] == outcomes["split"] and s["pieces_created"] == outcomes["pieces"]
    assert s["dropped_contaminated"] == 1 and s["dropped_contaminated_too_many_pieces"] == 1
    assert s["total"] + s["pieces_created"] - s["documents_split"] == s["forwarded"] + s["dropped"]


def test_counts_merge_exactly_over_tasks(corpus, tmp_path):
    """Two tasks see halves of the corpus: documents add up, eval items are a union (not a sum)."""
    work = tmp_path / "work"
    step = _step(corpus, "split", work)
    clone = pickle.loads(pickle.dumps(step))  # what an executor ships to a worker: no index inside
    assert clone._index is None and len(pickle.dumps(step)) < 20_000
    run_step(clone, corpus.docs[::2], rank=0, world_size=2)
    run_step(_step(corpus, "split", work), corpus.docs[1::2], rank=1, world_size=2)
    assert len(list(work.glob("index-*"))) == 1  # built once, reused
    summary = merge_overlap([json.loads(overlap_path(work, r).read_text()) for r in (0, 1)])
    assert _counts_only(summary) == expected_counts(corpus)
    assert summary["tasks"] == summary["tasks_reported"] == 2


# -- real web text -------------------------------------------------------------------------------------------------


def _word_tokens(text: str) -> list[re.Match]:
    """Whitespace tokens with a letter or digit: a planted span starts and ends on one, so it starts and ends
    exactly where its first and last normalised word do."""
    return [m for m in re.finditer(r"\S+", text) if any(c.isalnum() for c in m.group())]


@pytest.mark.shared_data
def test_both_policies_on_real_web_text(tmp_path):
    """Real C4 pages as training data; passages of real Wikipedia articles and the human-written Alpaca seed
    instructions as eval sets; some passages planted into some pages."""
    c4 = [json.loads(x)["text"] for x in open(shared_file("web/llamafactory_c4_demo.jsonl"), encoding="utf-8")]
    wiki = open(shared_file("web/llamafactory_wiki_demo.txt"), encoding="utf-8").read().splitlines()
    seeds_path = shared_file("chat/stanford_alpaca_seed_tasks.jsonl")
    seeds = [json.loads(x)["instruction"] for x in open(seeds_path, encoding="utf-8")]
    rng = random.Random(1)
    passages = []
    for article in wiki[:20]:
        tokens = _word_tokens(article)
        half = len(tokens) // 2
        for lo in (0, half):  # two passages per article, from its two halves: they share no n-gram
            a = lo + rng.randrange(half - 40)
            passages.append(article[tokens[a].start() : tokens[a + rng.randint(13, 30) - 1].end()])
    (tmp_path / "wiki_passages.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    eval_sets = [
        {"path": str(tmp_path / "wiki_passages.jsonl")},
        {"path": str(seeds_path), "text_key": "instruction", "name": "seeds"},
    ]
    long_seeds = [i for i, s in enumerate(seeds) if len(normalized_words(s)) >= N]

    docs, spans, planted = [], {}, {"wiki_passages": {}, "seeds": {}}
    for d, text in enumerate(c4):
        doc_id = f"c4-{d}"
        if d % 15 == 7:  # plant one passage or seed instruction at a word boundary
            set_name, items = ("wiki_passages", passages) if d % 2 else ("seeds", seeds)
            item = rng.randrange(len(items)) if set_name == "wiki_passages" else rng.choice(long_seeds)
            cut = rng.choice([m.start() for m in re.finditer(r"(?<=\s)\S", text)] or [0])
            text = text[:cut] + items[item] + "\n" + text[cut:]
            words = _word_tokens(items[item])  # the span runs from its first to its last word token
            spans[doc_id] = [(cut + words[0].start(), cut + words[-1].end())]
            planted[set_name].setdefault(item, set()).add(doc_id)
        docs.append(Document(text=text, id=doc_id))
    assert 15 <= len(spans) <= 25

    drop = DecontaminateStep(eval_sets, ngram=N, policy="drop", work_dir=tmp_path / "work")
    out, dropped = run_step(drop, docs)
    assert set(dropped) == set(spans)
    originals = {d.id: d.text for d in docs}
    assert all(d.text.encode() == originals[d.id].encode() for d in out) and len(out) == len(docs) - len(spans)
    summary = merge_overlap([json.loads(overlap_path(tmp_path / "work", 0).read_text())])
    for name, by_item in planted.items():
        entry = summary["eval_sets"][name]
        assert entry["contaminated_item_indices"] == sorted(by_item)
        assert entry["contaminated_documents"] == len(set().union(*by_item.values()))
    seeds_entry = summary["eval_sets"]["seeds"]
    assert seeds_entry["items"] == len(seeds) and seeds_entry["items_too_short"] == len(seeds) - len(long_seeds)

    split = DecontaminateStep(eval_sets, ngram=N, policy="split")
    out, dropped = run_step(split, docs)
    got: dict[str, list[str]] = {}
    for doc in out:
        got.setdefault(doc.id.split("/part")[0], []).append(doc.text)
    for doc in docs:
        if doc.id not in spans:
            assert got[doc.id] == [doc.text]
            continue
        want = expected_outcome(doc.text, spans[doc.id])
        assert (dropped.get(doc.id) if isinstance(want, str) else got.get(doc.id)) == want, doc.id


# -- bad input: errors that name the file and key, before any work -------------------------------------------------


def _recipe(tmp_path: Path, eval_sets: list[dict], **extra) -> Path:
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        inp.write_text(json.dumps({"id": "a", "text": "some training text " * 30}) + "\n")
    recipe = {
        "name": "decon",
        "output_dir": str(tmp_path / "run"),
        "inputs": [{"kind": "jsonl", "path": str(inp)}],
        "filters": [{"kind": "decontaminate", "eval_sets": eval_sets, **extra}],
        "dedup": {"exact": True, "url": False},
        "executor": {"kind": "local", "tasks": 1, "workers": 1},
        "progress": False,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _load(recipe: Path) -> DataRecipe:
    return load_config(DataRecipe, recipe)


def test_bad_eval_sets_fail_at_recipe_load(tmp_path):
    long = " ".join(f"w{i}" for i in range(20))
    (tmp_path / "nokey.jsonl").write_text(json.dumps({"id": 1, "question": long}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "evals.csv").write_text("text\nhello\n")
    pq.write_table(pa.table({"prompt": [long]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows.parquet")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": long}) + "\n")
    missing = tmp_path / "nope.jsonl"
    cases = [
        ([{"path": str(missing)}], {}, "key 'filters[0].eval_sets[0]'", f"eval set {missing} does not exist"),
        (
            [{"path": str(tmp_path / "ok.jsonl")}, {"path": str(tmp_path / "nokey.jsonl")}],
            {},
            "key 'filters[0].eval_sets[1]'",
            f"eval set {tmp_path / 'nokey.jsonl'}: line 1 has no text field 'text' (its keys: id, question)",
        ),
        (
            [{"path": str(tmp_path / "nocol.parquet"), "text_key": "question"}],
            {},
            "key 'filters[0].eval_sets[0]'",
            f"eval set {tmp_path / 'nocol.parquet'}: has no text field 'question' (its columns: prompt)",
        ),
        ([{"path": str(tmp_path / "empty.jsonl")}], {}, "key 'filters[0].eval_sets[0]'", f"eval set {tmp_path / 'empty.jsonl'} is empty: no items"),
        ([{"path": str(tmp_path / "empty.txt")}], {}, "key 'filters[0].eval_sets[0]'", f"eval set {tmp_path / 'empty.txt'} is empty: no items"),
        ([{"path": str(tmp_path / "norows.parquet")}], {}, "key 'filters[0].eval_sets[0]'", f"eval set {tmp_path / 'norows.parquet'} is empty: no items"),
        (
            [{"path": str(tmp_path / "evals.csv")}],
            {},
            "key 'filters[0].eval_sets[0]'",
            f"eval set {tmp_path / 'evals.csv'}: unknown format 'evals.csv'; expected one of .json, .jsonl, .ndjson, "
            ".parquet, .text, .txt (optionally .gz, except .parquet)",
        ),
        (
            [{"path": str(tmp_path / "ok.jsonl")}, {"path": str(tmp_path / "ok.jsonl")}],
            {},
            "key 'filters[0]'",
            "eval_sets: names must be unique (repeated: ['ok']); set `name:` on each",
        ),
        ([], {}, "key 'filters[0]'", "eval_sets: give at least one evaluation set ({path, text_key?, name?})"),
        ([{"path": str(tmp_path / "ok.jsonl")}], {"ngram": 0}, "key 'filters[0]'", "ngram must be >= 1 (13 in GPT-3 and MT-NLG), got 0"),
    ]  # fmt: skip
    for eval_sets, extra, where, message in cases:
        recipe = _recipe(tmp_path, eval_sets, **extra)
        with pytest.raises(ConfigError) as e:
            _load(recipe)
        assert str(e.value) == f"{recipe}: {where}: {message}"
    recipe = _recipe(tmp_path, [{"path": str(tmp_path / "ok.jsonl")}], policy="cut")
    with pytest.raises(ConfigError, match=r"key 'filters\[0\].policy': expected one of \['drop', 'split'\], got 'cut'"):
        _load(recipe)


def test_bad_items_fail_when_the_pipeline_is_built_before_any_task(tmp_path, capsys):
    long = " ".join(f"w{i}" for i in range(20))
    later = tmp_path / "later.jsonl"  # the first record is fine: recipe loading passes, building the index fails
    later.write_text(
        json.dumps({"text": long}) + "\n" + json.dumps({"text": long}) + "\n" + json.dumps({"id": 3}) + "\n"
    )
    short = tmp_path / "short.txt"
    short.write_text("a b c\n\nfour five six seven\n")
    for path, message in [
        (later, f"decontaminate: eval set {later}: line 3 has no text field 'text' (its keys: id)"),
        (
            short,
            f"decontaminate: eval set 'short' ({short}): none of its 2 items has 13 or more words, so nothing can "
            "be matched; lower `ngram` or drop the set",
        ),
    ]:
        recipe = _recipe(tmp_path, [{"path": str(path)}])
        cfg = _load(recipe).filters[0]
        with pytest.raises(ConfigError) as e:
            build_filter(cfg)
        assert str(e.value) == message
        assert main(["data", "run", str(recipe)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run" / "logs").exists()  # no stage started


def test_registered_among_the_filters(corpus, tmp_path):
    assert FILTER_CONFIGS["decontaminate"] is DecontaminateConfig
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(**s) for s in corpus.eval_sets], policy="split")
    step = build_filter(cfg)
    assert isinstance(step, DecontaminateStep) and step.policy == "split" and step.work_dir is None
    # in a run directory, the exclusion writer's <run>/excluded/<step> places the cache in <run>/work/decontaminate
    from datatrove.pipeline.writers import JsonlWriter

    step = build_decontaminate(cfg, JsonlWriter(str(tmp_path / "run" / "excluded" / "decontaminate")))
    assert step.work_dir == str((tmp_path / "run" / "work" / "decontaminate").resolve())


# -- end to end ----------------------------------------------------------------------------------------------------


def test_kiln_data_run_with_decontamination_balances(corpus, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(2):
        with open(inp / f"part{k}.jsonl", "w") as f:
            for doc in corpus.docs[k::2]:
                f.write(json.dumps({"id": doc.id, "text": doc.text, "url": doc.metadata["url"]}) + "\n")
    recipe = {
        "name": "decon",
        "output_dir": str(tmp_path / "run"),
        "inputs": [{"kind": "jsonl", "path": str(inp)}],
        "filters": [{"kind": "decontaminate", "eval_sets": corpus.eval_sets, "ngram": N, "policy": "split"}],
        # pieces of one document share its URL; URL dedup keys them by piece, so none removes another
        "dedup": {"exact": True, "url": True},
        "executor": {"kind": "local", "tasks": 2, "workers": 2},
        "progress": False,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", "run", str(tmp_path / "r.yaml")]) == 0

    run = tmp_path / "run"
    report = build_report(run)
    want: dict[str, str] = {}
    n_split = n_pieces = 0
    reasons: list[str] = []
    for doc in corpus.docs:
        outcome = expected_outcome(doc.text, corpus.spans[doc.id]) if doc.id in corpus.spans else None
        if outcome is None:
            want[doc.id] = doc.text
        elif isinstance(outcome, str):
            reasons.append(outcome)
        else:
            n_split += 1
            n_pieces += len(outcome)
            want |= {f"{doc.id}/part{k}": t for k, t in enumerate(outcome)}
    assert {r["id"]: r["text"] for r in iter_output(run / "output")} == want
    assert report.balanced and not report.incomplete_stages
    assert (report.documents_split, report.pieces_created) == (n_split, n_pieces)
    assert report.input_records == len(corpus.docs) and report.kept == len(want)
    assert report.dropped == {"Decontaminate": {r: reasons.count(r) for r in reasons}}
    excluded = [r["metadata"]["filter_reason"] for r in iter_output(run / "excluded" / "decontaminate")]
    assert sorted(excluded) == sorted(reasons)
    written = json.loads((run / "report" / "decontamination.json").read_text())
    assert written == load_summary(run)
    assert _counts_only(written) == expected_counts(corpus)
    assert written["tasks"] == written["tasks_reported"] == 2 and written["documents_checked"] == len(corpus.docs)
    table = (run / "report" / "stats.txt").read_text()
    assert f"+ pieces {n_pieces} - split {n_split} = kept {len(want)}" in table and "balanced" in table
    assert "decontamination (13-grams, split), details in decontamination.json:" in table
    qa = expected_counts(corpus)["qa"]
    assert (
        f"qa: {qa['contaminated_documents']} documents overlap {qa['contaminated_items']} of 11 items (2 too short)"
        in table
    )
    assert json.loads((run / "report" / "stats.json").read_text())["pieces_created"] == n_pieces
