"""Our heuristic filters (data_pipeline/filters/heuristics.py) against datatrove's stock classes, document by
document: the same keep/drop decision, the same reason, the same kept text (C4 edits it) and the same stats, on
synthetic documents that hit every drop reason and on the shared web pages. No timing here: benchmarks/filters.py."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from dataclasses import replace

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.text import split_into_sentences, split_into_words

from kiln.config import ConfigError, build_dataclass
from kiln.data_pipeline.filters import (
    C4QualityConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    build_filter,
)
from kiln.data_pipeline.filters.heuristics import (
    KilnC4QualityFilter,
    KilnFineWebQualityFilter,
    KilnGopherQualityFilter,
    KilnGopherRepetitionFilter,
)
from kiln.data_pipeline.filters.text_analysis import splitter

from conftest import shared_file
from test_filters import (  # the same hand-written documents as the stock-filter tests
    C4_PAGE,
    GOOD,
    LONG,
    PARAS,
    UNPUNCTUATED,
)

RECIPE_ORDER = [GopherRepetitionConfig(), GopherQualityConfig(), C4QualityConfig(), FineWebQualityConfig()]

# ---------------------------------------------------------------- synthetic documents

SENTENCES = GOOD.split(". ")

REASON_DOCS = [
    # gopher quality
    GOOD,
    "The cat sat on the mat.",
    " ".join(["a to of in at by it is an on"] * 8) + " the and",
    " ".join(["extraordinarily incomprehensibilities internationalization"] * 20) + " the and of",
    GOOD + " ".join(f"#tag{i}" for i in range(12)),
    GOOD + " wait... " * 12,
    GOOD + " wait… " * 12,
    "\n".join("- " + s for s in SENTENCES),
    "\n".join("• " + s for s in SENTENCES),
    "\n".join(s + ("..." if i % 2 == 0 else ".") for i, s in enumerate(SENTENCES)),
    GOOD + " " + " ".join(str(10000 + i) for i in range(30)),
    " ".join(["Photosynthesis converts sunlight into chemical energy inside green plants"] * 8),
    # gopher repetition
    "",
    "\n\n".join(PARAS[:3] + PARAS[:2]),
    "\n\n".join([LONG, *PARAS, LONG]),
    "\n".join(PARAS[:3] + PARAS[:2]),
    "\n".join([LONG, *PARAS, LONG]),
    "buy now " * 40,
    "buy the cheap shoes here " * 12,
    GOOD + GOOD,
    GOOD + " " + " ".join(GOOD.split()[:12]),
    # c4 (and their pages after C4 for FineWeb)
    C4_PAGE,
    C4_PAGE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    C4_PAGE + "\nThe function body is written as { return x; } in this example.",
    "Farmers have worked the land for many centuries.\nThe old stone bridges still carry travellers.\nMenu",
    "[edit] The river [citation needed] has shaped the valley. It carved channels [12].\n" * 3 + GOOD,
    "A line with " + "x" * 1200 + " a very long word.\n" + C4_PAGE,
    # fineweb
    GOOD.replace(". ", ".\n"),
    "  \n \n",
    "\n".join(UNPUNCTUATED),
    "\n".join(["Yes.", "No.", "Maybe so.", "Of course!", PARAS[0]]),
    "\n".join([*PARAS, PARAS[0]]),
    "\n".join(f"Incomprehensibilities{i} internationalization." for i in range(20)),
]

# Documents aimed at the word split and the line/sentence shortcuts (see text_analysis): spaCy special cases and
# affixes, whitespace runs inside and at the ends of lines, every line break str.splitlines knows, citations that
# leave leading/trailing/double spaces, non-ASCII letters and digits. (Not "IS_ALPHA": datatrove's own split of a
# text containing it depends on what its tokenizer saw before, see text_analysis.Splitter.tokens.)
EDGE_DOCS = [
    "At 9 a.m. the U.S. team met Dr. Smith :) and said \"don't go\". It's 3.5 km away! Really?  Yes.\n" * 6,
    "Tabs\tinside\tthe line. And  double  spaces here.\nTrailing spaces.   \n   Leading spaces too.\n" * 5,
    "Windows line ends here.\r\nAnother line ends here!\r\nThird line, no end\r\n" * 6 + GOOD,
    "Vertical\x0btab line. Form\x0cfeed line.\x1cFile sep.\x1dGroup sep.\x1eRecord sep.\x85Next line.\n" * 4 + GOOD,
    "Line sep\u2028para sep\u2029no-break\xa0space. Ideographic\u3000space here.\n" * 4 + GOOD,
    "[1] Citation first. The fox runs.\nCitation last [2]\nMiddle [3] citation here. Ok.\n[edit]\n" * 4 + GOOD,
    "Ünïcödé wörds ärë fïnë. Straße und Größe. Ça va très bien! ² ½ ٣ ۴ numbers.\n" * 5 + GOOD,
    "E-mail me at someone@example.com or visit https://example.com/a.b?c=d. Done.\n" * 5 + GOOD,
    "... ... . . !! ?? -- —— ## ** \n" * 8 + GOOD,
    "Sentence one. sentence two.Sentence three.Four!five?six\n" * 6,
    "\n\n\n" + GOOD + "\n\n\n" + GOOD.upper() + "\n\n",
    " ".join(f"word{i % 17}" for i in range(400)) + ".",
    "ab c ab c ab c " * 20 + "a bc a bc a bc " * 20,  # equal "".join n-grams from different words
    "   ",
    ".",
    "\n",
]

SYNTHETIC = REASON_DOCS + EDGE_DOCS


def _configs() -> list:
    """Default configs plus variants that reach every reason and the other code paths."""
    cfgs = list(RECIPE_ORDER)
    cfgs += [
        GopherQualityConfig(min_doc_words=10, max_doc_words=40, min_stop_words=None),
        GopherQualityConfig(stop_words=["river", "valley"], min_stop_words=2, min_alpha_words_ratio=None),
        GopherRepetitionConfig(top_n_grams={2: 0.99}),
    ]
    cfgs += [GopherRepetitionConfig(top_n_grams={n: 0.05}, dup_n_grams={}) for n in (2, 3, 4)]
    cfgs += [GopherRepetitionConfig(top_n_grams={}, dup_n_grams={n: 0.05}) for n in range(5, 11)]
    cfgs += [
        C4QualityConfig(filter_no_terminal_punct=False, min_words_per_line=None, min_num_sentences=None),
        C4QualityConfig(filter_no_terminal_punct=False, min_words_per_line=None),
        C4QualityConfig(remove_citations=False, min_num_sentences=3),
        C4QualityConfig(split_paragraph=False),
        C4QualityConfig(max_word_length=None, filter_policy=False, filter_javascript=False),
        FineWebQualityConfig(line_punct_thr=0.0),
        FineWebQualityConfig(line_punct_exclude_zero=True, new_line_ratio=0.05),
    ]
    return cfgs


ALL_REASONS = {
    "gopher_quality": {
        "gopher_short_doc",
        "gopher_long_doc",
        "gopher_below_avg_threshold",
        "gopher_above_avg_threshold",
        "gopher_too_many_hashes",
        "gopher_too_many_ellipsis",
        "gopher_too_many_bullets",
        "gopher_too_many_end_ellipsis",
        "gopher_below_alpha_threshold",
        "gopher_enough_stop_words",
    },
    "gopher_repetition": {
        "empty",
        "dup_para_frac",
        "dup_para_char_frac",
        "dup_line_frac",
        "dup_line_char_frac",
        *(f"top_{n}_gram" for n in (2, 3, 4)),
        *(f"duplicated_{n}_n_grams" for n in range(5, 11)),
    },
    "c4": {"lorem_ipsum", "curly_bracket", "too_few_sentences"},
    "fineweb": {"empty", "line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"},
}

# ---------------------------------------------------------------- comparison helpers


def _outcomes(step, texts: list[str]) -> tuple[list, dict]:
    """Run ``step`` as a pipeline step; per text (kept?, reason, text after), and every stat's (total, n)."""
    results = []
    original = step.filter

    def recording(doc):
        res = original(doc)
        results.append(res)
        return res

    step.filter = recording
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    list(step.run(iter(docs)))
    step.filter = original
    per_doc = []
    for doc, res in zip(docs, results, strict=True):
        kept, reason = (res, None) if isinstance(res, bool) else res
        per_doc.append((bool(kept), reason, doc.text if kept else None))
    stats = {k: (v.total, v.n) for k, v in step.stats.stats.items()}
    return per_doc, stats


def _both(cfg):
    return build_filter(replace(cfg, implementation="datatrove")), build_filter(replace(cfg, implementation="kiln"))


def _assert_same(cfg, texts: list[str]) -> list:
    stock, ours = _both(cfg)
    assert type(ours).__mro__[1] is type(stock)  # ours subclasses the stock class
    theirs, their_stats = _outcomes(stock, texts)
    mine, my_stats = _outcomes(ours, texts)
    for i, (a, b) in enumerate(zip(theirs, mine, strict=True)):
        assert a == b, f"{cfg}: document {i} {texts[i][:80]!r}: datatrove {a[:2]}, kiln {b[:2]}"
    assert my_stats == their_stats
    return theirs


def _chain(impl: str, texts: list[str]) -> list:
    """The recipe order, one document at a time through all four filters: where each document stops and why,
    and the final text."""
    steps = [build_filter(replace(c, implementation=impl)) for c in RECIPE_ORDER]
    out = []
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i))
        verdict = None
        for k, step in enumerate(steps):
            res = step.filter(doc)
            if res is not True:
                verdict = (k, res)
                break
        out.append((verdict, doc.text))
    return out


# ---------------------------------------------------------------- tests


def test_synthetic_documents_same_decision_reason_text_and_stats():
    hit: dict[str, set] = {kind: set() for kind in ALL_REASONS}
    for cfg in _configs():
        for kept, reason, _ in _assert_same(cfg, SYNTHETIC):
            if not kept:
                hit[cfg.kind].add(reason)
    assert hit == ALL_REASONS  # every drop reason of every filter was compared at least once


def test_synthetic_documents_same_in_recipe_chain():
    assert _chain("kiln", SYNTHETIC) == _chain("datatrove", SYNTHETIC)


def test_word_split_and_line_sentences_match_datatrove():
    sp = splitter("en")
    assert sp.fast
    for text in SYNTHETIC:
        assert sp.words(text) == split_into_words(text), text[:80]
        for line in text.splitlines():
            assert sp.count_sentences_of(line) == len(split_into_sentences(line)), line
    assert sp.tokens("a IS_ALPHA b") is None  # datatrove's own function for these
    for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029":  # splitlines' line ends are all whitespace
        assert ch.isspace() and len(f"a{ch}b".splitlines()) == 2


def _sample_texts() -> list[str]:
    web = shared_file("web/wceb_modern_1000_url_text.jsonl")
    c4 = shared_file("web/llamafactory_c4_demo.jsonl")
    texts = []
    for path, n in ((web, 50), (c4, 50)):
        with open(path) as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(n), f)]
    return texts


def test_shared_web_pages_same_decisions_per_filter_and_in_chain():
    texts = _sample_texts()
    for cfg in RECIPE_ORDER:
        _assert_same(cfg, texts)
    assert _chain("kiln", texts) == _chain("datatrove", texts)


def test_shared_web_pages_words_and_c4_output_words():
    """The split is datatrove's, and the words C4 records for the text it keeps (read by FineWeb) are the words of
    that text."""
    sp = splitter("en")
    c4 = build_filter(C4QualityConfig())
    for i, text in enumerate(_sample_texts()[::3]):
        assert sp.words(text) == split_into_words(text)
        doc = Document(text=text, id=str(i))
        if c4.filter(doc) is True:
            assert sp.peek(doc.text) is not None
            assert sp.peek(doc.text).words == split_into_words(doc.text)


def test_exclusion_writer_and_pickling(tmp_path):
    texts = [GOOD, "The cat sat on the mat.", C4_PAGE + "\nIt is written { return x; } here.", "buy now " * 40]
    rows = {}
    for impl in ("datatrove", "kiln"):
        for cfg in RECIPE_ORDER:
            out = tmp_path / impl / cfg.kind
            step = build_filter(replace(cfg, implementation=impl), JsonlWriter(str(out), compression=None))
            step = pickle.loads(pickle.dumps(step))  # executors ship steps to workers
            list(step.run(iter(Document(text=t, id=str(i)) for i, t in enumerate(texts))))
            written = [json.loads(line) for p in sorted(out.glob("*.jsonl")) for line in p.read_text().splitlines()]
            rows[impl, cfg.kind] = [(r["id"], r["text"], r["metadata"]["filter_reason"]) for r in written]
    for cfg in RECIPE_ORDER:
        assert rows["kiln", cfg.kind] == rows["datatrove", cfg.kind]
    assert rows["kiln", "gopher_quality"][0] == ("1", "The cat sat on the mat.", "gopher_short_doc")
    assert [r[2] for r in rows["kiln", "c4"]] == ["too_few_sentences"] * 2 + ["curly_bracket", "too_few_sentences"]


def test_implementation_selects_the_class_and_names_match():
    classes = {
        "gopher_quality": (KilnGopherQualityFilter, GopherQualityFilter),
        "gopher_repetition": (KilnGopherRepetitionFilter, GopherRepetitionFilter),
        "c4": (KilnC4QualityFilter, C4QualityFilter),
        "fineweb": (KilnFineWebQualityFilter, FineWebQualityFilter),
    }
    for cfg in RECIPE_ORDER:
        ours, stock = classes[cfg.kind]
        assert cfg.implementation == "kiln"
        assert type(build_filter(cfg)) is ours
        assert type(build_filter(replace(cfg, implementation="datatrove"))) is stock
        assert ours.name == stock.name  # step names in stats and reports stay the same
    cfg = build_dataclass(GopherQualityConfig, {"implementation": "datatrove"})
    assert type(build_filter(cfg)) is GopherQualityFilter
    with pytest.raises(ConfigError, match="implementation"):
        build_dataclass(C4QualityConfig, {"implementation": "spacy"})


def test_fresh_tokenizer_when_vocabulary_is_full(monkeypatch):
    """Memory stays bounded: past VOCAB_LIMIT lexemes the splitter starts a fresh spaCy tokenizer; same words."""
    from kiln.data_pipeline.filters import text_analysis

    sp = text_analysis.Splitter("en")
    first = sp._tokenizer
    monkeypatch.setattr(text_analysis, "VOCAB_LIMIT", len(first.vocab) + 100)
    for text in SYNTHETIC * 2:
        toks = sp.tokens(text)
        assert toks is None or text_analysis.words_of(text, toks[0], toks[1]) == split_into_words(text)
    assert sp._tokenizer is not first  # restarted at least once


FRENCH = (
    "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde depuis la terrasse. "
    "Aujourd'hui, c'est-à-dire le 3 mai, M. Dupont n'est pas là : il est allé à l'hôpital avec l'enfant. "
)
GERMAN = (
    "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer von der Veranda aus zuschaut. "
    "Z. B. kam Dr. Müller am 3. Mai um 9 Uhr an; er sagte: „Das ist ja unglaublich!“ Und dann ging er. "
)


@pytest.mark.parametrize("language,text", [("fr", FRENCH), ("de", GERMAN)])
def test_other_spacy_languages(language, text):
    sp = splitter(language)
    docs = [text * k + "\n" + text.replace(". ", ".\n") for k in (1, 3)] + [text.replace(" ", "\t", 5)]
    for doc in docs:
        assert sp.words(doc) == split_into_words(doc, language)
        for line in doc.splitlines():
            assert sp.count_sentences_of(line) == len(split_into_sentences(line, language))
    for cfg in (GopherQualityConfig, GopherRepetitionConfig, C4QualityConfig, FineWebQualityConfig):
        _assert_same(cfg(language=language), docs + REASON_DOCS[:12])


def test_datatrove_functions_where_the_fast_path_is_off(monkeypatch):
    """A splitter without the spaCy shortcut (other tokenizers, or spaCy raised) uses datatrove's functions."""
    from kiln.data_pipeline.filters import text_analysis

    sp = text_analysis.Splitter("en")
    sp.fast = False
    monkeypatch.setattr(text_analysis, "splitter", lambda language: sp)
    monkeypatch.setattr("kiln.data_pipeline.filters.heuristics.splitter", lambda language: sp)
    assert sp.tokens(GOOD) is None and sp.words(GOOD) == split_into_words(GOOD)
    for cfg in RECIPE_ORDER:
        _assert_same(cfg, REASON_DOCS + EDGE_DOCS[:4])


def test_loading_the_word_split_does_not_import_torch():
    """spaCy's thinc imports torch when it is installed (~1 s per worker process); our splitter keeps it out, and
    torch still imports normally afterwards."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    code = (
        "import sys\n"
        "from kiln.data_pipeline.filters.text_analysis import splitter\n"
        "assert splitter('en').words('The cat sat on the mat.') == ['The', 'cat', 'sat', 'on', 'the', 'mat', '.']\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.ones(1).item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "1.0"]
