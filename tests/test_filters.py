"""Quality filters: every drop reason of every filter on hand-made documents, offline language ID, the DCLM-style
classifier (trained on synthetic data, and on ../shared/data when present), the train-quality CLI and the recipe
configs. The whole module runs with the network blocked: nothing may download."""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import random
import re
import socket
from dataclasses import dataclass, field

import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter

from kiln.config import ConfigError, build_dataclass, load_config
from kiln.data_pipeline.filters import (
    C4QualityConfig,
    FilterConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    QualityClassifierConfig,
    build_filter,
    normalize_text,
    read_examples,
    train_quality_classifier,
)
from kiln.data_pipeline.filters import cli as filters_cli
from kiln.data_pipeline.filters.training import fasttext_train_supervised

from conftest import shared_file


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection (model or nltk/punkt downloads) fails the test. Local (AF_UNIX)
    sockets stay allowed: datatrove's executor talks to a multiprocessing manager through one."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family == socket.AF_UNIX:
            return real_connect(sock, address)
        refuse(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def run_filter(step, texts: list[str]) -> tuple[list[Document], dict[str, int]]:
    """Run a filter over texts; return the kept documents and the drop counters (dropped, dropped_<reason>)."""
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    kept = list(step.run(iter(docs)))
    stats = {k: int(v.total) for k, v in step.stats.stats.items()}
    assert stats["total"] == len(texts)
    assert stats.get("forwarded", 0) == len(kept)
    drops = {k: v for k, v in stats.items() if k.startswith("dropped")}
    assert drops.get("dropped", 0) == sum(v for k, v in drops.items() if k != "dropped")  # every drop has a reason
    return kept, drops


GOOD = (
    "The history of the river valley is long and varied. Farmers have worked the land for many centuries, "
    "and the old stone bridges still carry travellers across the water. In spring the fields turn green, "
    "while in autumn the harvest brings the whole village together to share food and stories. "
    "Historians say that the first settlers arrived with cattle and simple tools. "
)
PARAS = [
    "Farmers have worked the land for many centuries.",
    "The old stone bridges still carry travellers across the water.",
    "In spring the fields turn green and the lambs are born.",
    "Historians say that the first settlers arrived with cattle.",
]
LONG = (
    "The river has shaped the valley for thousands of years, carving deep channels through soft limestone and "
    "leaving rich soil on its banks for the farms that followed."
)

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde depuis la terrasse.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer von der Veranda aus zuschaut.",
}


# ---------------------------------------------------------------- heuristic rule sets (datatrove stock filters)


def test_gopher_quality_every_reason():
    texts = [
        GOOD,
        "The cat sat on the mat.",
        " ".join(["a to of in at by it is an on"] * 8) + " the and",
        " ".join(["extraordinarily incomprehensibilities internationalization"] * 20) + " the and of",
        GOOD + " ".join(f"#tag{i}" for i in range(12)),
        GOOD + " wait... " * 12,
        "\n".join("- " + s for s in GOOD.split(". ")),
        "\n".join(s + ("..." if i % 2 == 0 else ".") for i, s in enumerate(GOOD.split(". "))),
        GOOD + " " + " ".join(str(10000 + i) for i in range(30)),
        " ".join(["Photosynthesis converts sunlight into chemical energy inside green plants"] * 8),
    ]
    kept, drops = run_filter(build_filter(GopherQualityConfig()), texts)
    assert [d.text for d in kept] == [GOOD]
    assert drops == {
        "dropped": 9,
        "dropped_gopher_short_doc": 1,
        "dropped_gopher_below_avg_threshold": 1,
        "dropped_gopher_above_avg_threshold": 1,
        "dropped_gopher_too_many_hashes": 1,
        "dropped_gopher_too_many_ellipsis": 1,
        "dropped_gopher_too_many_bullets": 1,
        "dropped_gopher_too_many_end_ellipsis": 1,
        "dropped_gopher_below_alpha_threshold": 1,
        "dropped_gopher_enough_stop_words": 1,
    }


def test_gopher_quality_configured_thresholds():
    no_stop = " ".join(["Photosynthesis converts sunlight into chemical energy inside green plants"] * 8)
    cfg = build_dataclass(GopherQualityConfig, {"min_doc_words": 10, "max_doc_words": 40, "min_stop_words": None})
    kept, drops = run_filter(build_filter(cfg), [GOOD, no_stop, "The cat sat on the mat."])
    assert drops == {"dropped": 3, "dropped_gopher_long_doc": 2, "dropped_gopher_short_doc": 1}
    cfg = build_dataclass(GopherQualityConfig, {"min_stop_words": None, "min_doc_words": 5})
    kept, drops = run_filter(build_filter(cfg), [GOOD, no_stop, "The cat sat on the mat."])
    assert [d.text for d in kept] == [GOOD, no_stop]  # no stop-word rule; the cat's words are short (2.7 < 3)
    assert drops == {"dropped": 1, "dropped_gopher_below_avg_threshold": 1}


def test_gopher_repetition_every_reason():
    texts = [
        GOOD,
        "",
        "\n\n".join(PARAS[:3] + PARAS[:2]),  # 2 of 5 paragraphs repeated
        "\n\n".join([LONG, *PARAS, LONG]),  # 1 of 6 repeated, but a long one
        "\n".join(PARAS[:3] + PARAS[:2]),
        "\n".join([LONG, *PARAS, LONG]),
        "buy now " * 40,
        GOOD + GOOD,  # no repeated line, but every 5-gram twice
    ]
    kept, drops = run_filter(build_filter(GopherRepetitionConfig()), texts)
    assert [d.text for d in kept] == [GOOD]
    assert drops == {
        "dropped": 7,
        "dropped_empty": 1,
        "dropped_dup_para_frac": 1,
        "dropped_dup_para_char_frac": 1,
        "dropped_dup_line_frac": 1,
        "dropped_dup_line_char_frac": 1,
        "dropped_top_2_gram": 1,
        "dropped_duplicated_5_n_grams": 1,
    }
    # n-gram thresholds come from YAML as {n: fraction}, and a mapping replaces the default one: with only a loose
    # top-2-gram rule left, the spam reaches the duplicated-5-gram rule
    cfg = build_dataclass(GopherRepetitionConfig, {"top_n_grams": {2: 0.99}})
    _, drops = run_filter(build_filter(cfg), ["buy now " * 40])
    assert drops == {"dropped": 1, "dropped_duplicated_5_n_grams": 1}


C4_PAGE = "\n".join(
    [
        "Home | About | Contact",
        "The river has shaped the valley for thousands of years. It carved deep channels through soft limestone.",
        "Farmers have worked the land for many centuries. The old stone bridges still carry travellers across.",
        "Please enable JavaScript to view the comments on this page.",
        "In spring the fields turn green and the lambs are born [1].",
        "This website uses cookies to improve your experience.",
        "Historians say that the first settlers arrived with cattle!",
        "Read more...",
    ]
)


def test_c4_every_reason_and_it_rewrites_kept_text():
    texts = [
        C4_PAGE,
        C4_PAGE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        C4_PAGE + "\nThe function body is written as { return x; } in this example.",
        "Farmers have worked the land for many centuries.\nThe old stone bridges still carry travellers.\nMenu",
    ]
    step = build_filter(C4QualityConfig())
    kept, drops = run_filter(step, texts)
    assert drops == {
        "dropped": 3,
        "dropped_lorem_ipsum": 1,
        "dropped_curly_bracket": 1,
        "dropped_too_few_sentences": 1,
    }
    # C4QualityFilter MODIFIES the kept document: menu, javascript, cookie-policy and UNPUNCTUATED lines are
    # removed and the citation marker is stripped.
    assert kept[0].text == "\n".join(
        [
            "The river has shaped the valley for thousands of years. It carved deep channels through soft limestone.",
            "Farmers have worked the land for many centuries. The old stone bridges still carry travellers across.",
            "In spring the fields turn green and the lambs are born .",
            "Historians say that the first settlers arrived with cattle!",
        ]
    )
    # removed lines are counted per rule (also in documents dropped later: lorem/curly come last on their pages)
    lines = {k: int(v.total) for k, v in step.stats.stats.items() if k.startswith("line-")}
    assert lines == {
        "line-total": 8 + 9 + 9 + 3,
        "line-kept": 4 + 4 + 4 + 2,
        "line-filter-no_terminal_punc": 2 + 2 + 2 + 1,
        "line-filter-javascript": 3,
        "line-filter-policy": 3,
    }
    # line rules off (FineWeb turns off the terminal-punctuation rule): the short page survives unchanged
    cfg = build_dataclass(
        C4QualityConfig, {"filter_no_terminal_punct": False, "min_words_per_line": None, "min_num_sentences": None}
    )
    kept, drops = run_filter(build_filter(cfg), [texts[3]])
    assert drops == {} and kept[0].text == texts[3]


UNPUNCTUATED = [
    "Home page of the village council",
    "Latest news and upcoming events today",
    "Contact the office during opening hours",
    "Photo gallery of the summer festival",
    "Opening hours of the public library",
    "Farmers have worked the land for many centuries",
    "Weather forecast for the coming weekend",
    "Minutes of the last council meeting",
    "Map of the walking trails nearby",
    "Farmers have worked the land for many centuries.",
]


def test_fineweb_every_reason():
    texts = [
        GOOD.replace(". ", ".\n"),
        "  \n \n",
        "\n".join(UNPUNCTUATED),  # 1 of 10 lines ends in punctuation (< 0.12)
        "\n".join(["Yes.", "No.", "Maybe so.", "Of course!", PARAS[0]]),
        "\n".join([*PARAS, PARAS[0]]),
        "\n".join(f"Incomprehensibilities{i} internationalization." for i in range(20)),
    ]
    kept, drops = run_filter(build_filter(FineWebQualityConfig()), texts)
    assert [d.text for d in kept] == [texts[0]]
    assert drops == {
        "dropped": 5,
        "dropped_empty": 1,
        "dropped_line_punct_ratio": 1,
        "dropped_short_line_ratio": 1,
        "dropped_char_dup_ratio": 1,
        "dropped_list_ratio": 1,
    }
    cfg = build_dataclass(FineWebQualityConfig, {"line_punct_thr": 0.0})
    _, drops = run_filter(build_filter(cfg), [texts[2]])
    assert drops == {}


def test_exclusion_writer_gets_dropped_docs_with_reason(tmp_path):
    step = build_filter(GopherQualityConfig(), exclusion_writer=JsonlWriter(str(tmp_path), compression=None))
    kept, _ = run_filter(step, [GOOD, "The cat sat on the mat."])
    assert len(kept) == 1
    (written,) = tmp_path.glob("*.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(r["text"], r["metadata"]["filter_reason"]) for r in rows] == [
        ("The cat sat on the mat.", "gopher_short_doc")
    ]


def test_step_names_are_distinct_and_steps_pickle(tmp_path):
    model = _tiny_quality_model(tmp_path)
    cfgs = [
        GopherQualityConfig(),
        GopherRepetitionConfig(),
        C4QualityConfig(),
        FineWebQualityConfig(),
        LanguageConfig(),
        QualityClassifierConfig(model=model),
    ]
    steps = [build_filter(c) for c in cfgs]
    assert len({s.name for s in steps}) == len(steps)
    for step in steps:  # executors ship steps to worker processes
        clone = pickle.loads(pickle.dumps(step))
        assert type(clone) is type(step)


def test_chain_in_local_executor_counts_every_drop_by_step(tmp_path):
    """The steps in datatrove's LocalPipelineExecutor: per-step stats JSON with dropped_<reason> (what
    data_pipeline/accounting.py reads); the documents entering each step = kept + dropped of the one before."""
    texts = [GOOD, SENTENCES["fr"], GOOD + GOOD, "The cat sat on the mat.", C4_PAGE]
    cfgs = [
        LanguageConfig(),
        GopherRepetitionConfig(),
        GopherQualityConfig(min_doc_words=20),
        C4QualityConfig(),
        FineWebQualityConfig(),
    ]
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    steps = [docs] + [build_filter(c) for c in cfgs]
    LocalPipelineExecutor(pipeline=steps, logging_dir=str(tmp_path), tasks=1, workers=1).run()
    stats = json.loads((tmp_path / "stats" / "00000.json").read_text())
    counts = {
        s["name"].split(": ", 1)[1]: {
            k: int(v["total"] if isinstance(v, dict) else v)
            for k, v in s["stats"].items()
            if k.startswith(("dropped", "forwarded", "total"))
        }
        for s in stats
    }
    assert counts == {
        "🌍 Language ID (offline)": {"total": 5, "forwarded": 4, "dropped": 1, "dropped_wrong_language": 1},
        # the 6-word cat sentence: its top 2-gram "The cat" is 30% of the characters
        "👯 Gopher Repetition": {
            "total": 4,
            "forwarded": 2,
            "dropped": 2,
            "dropped_duplicated_5_n_grams": 1,
            "dropped_top_2_gram": 1,
        },
        "🥇 Gopher Quality": {"total": 2, "forwarded": 2},
        # GOOD is one line of 4 sentences (< 5)
        "⛰ C4 Quality": {"total": 2, "forwarded": 1, "dropped": 1, "dropped_too_few_sentences": 1},
        "🍷 FineWeb Quality": {"total": 1, "forwarded": 1},
    }


# ---------------------------------------------------------------- language ID (offline)


def test_language_id_detects_en_fr_de_offline():
    step = build_filter(LanguageConfig(languages=["en", "fr", "de"]))
    kept, drops = run_filter(step, list(SENTENCES.values()))
    assert drops == {}
    assert [d.metadata["language"] for d in kept] == ["en", "fr", "de"]
    assert all(d.metadata["language_score"] > 0.95 for d in kept)


def test_language_id_drop_reasons():
    texts = [*SENTENCES.values(), "the house"]  # "the house": English, but only 0.39 sure
    kept, drops = run_filter(build_filter(LanguageConfig()), texts)
    assert [d.metadata["language"] for d in kept] == ["en"]
    assert drops == {"dropped": 3, "dropped_wrong_language": 2, "dropped_low_language_score": 1}
    # empty list: any language, only the confidence counts
    kept, drops = run_filter(build_filter(LanguageConfig(languages=[])), texts)
    assert len(kept) == 3 and drops == {"dropped": 1, "dropped_low_language_score": 1}
    # label_only annotates and keeps everything
    kept, drops = run_filter(build_filter(LanguageConfig(label_only=True)), texts)
    assert [d.metadata["language"] for d in kept] == ["en", "fr", "de", "en"] and drops == {}
    with pytest.raises(ValueError, match="not among the"):
        build_filter(LanguageConfig(languages=["qq"]))


def _write_fasttext_lid(tmp_path) -> str:
    """A tiny fastText LID model in lid.176's label format (__label__en ...), trained here: no download."""
    words = {
        "en": "the and of to in is that it was for on with as his they at be this from have or by one had".split(),
        "fr": "le la les et des est que une dans pour qui pas sur sont avec par plus ce il au du nous vous".split(),
        "de": "der die und das ist nicht mit sich des auf für sie von dem den ein eine auch als an nach wie".split(),
    }
    rng = random.Random(0)
    train = tmp_path / "lid.train.txt"
    with open(train, "w") as f:
        for _ in range(200):
            for lang, vocab in words.items():
                f.write(f"__label__{lang} {' '.join(rng.choices(vocab, k=12))}\n")
    model = fasttext_train_supervised(
        input=str(train), epoch=10, dim=8, bucket=1000, minn=2, maxn=4, seed=0, thread=1, verbose=0
    )
    path = tmp_path / "lid.bin"
    model.save_model(str(path))
    return str(path)


def test_fasttext_training_is_deterministic_for_small_models(tmp_path):
    """fastText 0.9.2 leaves most of a small input matrix uninitialised with thread=1 (recycled heap memory): without
    our workaround these runs gave different models, or died with "Encountered NaN", in one process."""
    train = tmp_path / "t.txt"
    rng = random.Random(0)
    with open(train, "w") as f:
        for _ in range(200):
            f.write(f"__label__a {' '.join(rng.choices(GLUE, k=12))}\n__label__b {' '.join(rng.choices(SPAM, k=12))}\n")
    outputs = set()
    for _ in range(6):
        model = fasttext_train_supervised(input=str(train), dim=16, epoch=5, seed=0, thread=1, verbose=0)
        labels, probs = model.predict("the of buy cheap", k=-1)
        outputs.add((labels, tuple(float(p) for p in probs)))
    assert len(outputs) == 1


def test_language_id_with_user_fasttext_model(tmp_path):
    path = _write_fasttext_lid(tmp_path)
    texts = [
        "the cat was in the house and it was on the mat",
        "le chat est dans la maison avec les enfants",
        "der Hund ist nicht mit dem Auto",
    ]
    kept, drops = run_filter(build_filter(LanguageConfig(languages=["fr"], fasttext_model=path)), texts)
    assert [d.text for d in kept] == [texts[1]]
    assert kept[0].metadata["language"] == "fr" and kept[0].metadata["language_score"] > 0.65
    assert drops == {"dropped": 2, "dropped_wrong_language": 2}
    with pytest.raises(ValueError, match="not among the 3 languages"):
        build_filter(LanguageConfig(languages=["es"], fasttext_model=path))
    with pytest.raises(FileNotFoundError, match="fastText model not found"):
        build_filter(LanguageConfig(fasttext_model=str(tmp_path / "missing.bin")))


# ---------------------------------------------------------------- quality classifier (DCLM-style)

TOPIC = (
    "river valley history farmers harvest village bridge settlers century climate soil research university museum "
    "language literature science theory evidence population government economy architecture medicine study"
).split()
SPAM = (
    "buy cheap click free win casino bonus deal offer discount sale prize winner subscribe password viagra loan "
    "crypto followers limited urgent guaranteed"
).split()
GLUE = "the of and in a to is was for that with as by on".split()


def _synthetic(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    docs = []
    for _ in range(n):
        words = [rng.choice(vocab) if rng.random() < 0.6 else rng.choice(GLUE) for _ in range(rng.randint(30, 60))]
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def _write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


def _tiny_quality_model(tmp_path) -> str:
    rng = random.Random(0)
    pos = _write_jsonl(tmp_path / "pos.jsonl", _synthetic(rng, TOPIC, 100))
    neg = _write_jsonl(tmp_path / "neg.jsonl", _synthetic(rng, SPAM, 100))
    out = str(tmp_path / "tiny.bin")
    train_quality_classifier([pos], [neg], out, epoch=5, dim=8, bucket=2000)
    return out


def test_train_quality_classifier_synthetic(tmp_path):
    rng = random.Random(1)
    pos = _write_jsonl(tmp_path / "pos.jsonl", _synthetic(rng, TOPIC, 200) + ["   "])
    neg_gz = tmp_path / "neg.jsonl.gz"
    with gzip.open(neg_gz, "wt") as f:
        for t in _synthetic(rng, SPAM, 200):
            f.write(json.dumps({"body": t}) + "\n")
    kwargs = dict(text_key="text", epoch=10, dim=16, bucket=5000, seed=3)
    with pytest.raises(ValueError, match=r"no string field 'text'.*\['body'\]"):
        train_quality_classifier([pos], [str(neg_gz)], str(tmp_path / "m.bin"), **kwargs)
    kwargs["text_key"] = "body"
    with pytest.raises(ValueError, match=r"pos.jsonl:1: no string field 'body'"):
        train_quality_classifier([pos], [str(neg_gz)], str(tmp_path / "m.bin"), **kwargs)

    # plain text file: one example per line; the JSONL positives re-written as text
    pos_txt = tmp_path / "pos.txt"
    pos_txt.write_text("\n".join(json.loads(line)["text"] for line in open(pos)) + "\n")
    metrics = train_quality_classifier([str(pos_txt)], [str(neg_gz)], str(tmp_path / "m.bin"), **kwargs)
    assert metrics["accuracy"] == 1.0 and metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert (metrics["train_positive"], metrics["valid_positive"]) == (180, 20)  # the blank line is not an example
    assert (metrics["train_negative"], metrics["valid_negative"]) == (180, 20)
    assert metrics["skipped_empty"] == 0
    train_lines = open(metrics["train_file"]).read().splitlines()
    assert len(train_lines) == 360 and {line.split(" ", 1)[0] for line in train_lines} == {"__label__hq", "__label__lq"}
    assert train_lines[:10] != sorted(train_lines[:10], key=lambda s: s.startswith("__label__lq"))  # interleaved

    # deterministic: same seed, same data -> same model scores
    again = train_quality_classifier([str(pos_txt)], [str(neg_gz)], str(tmp_path / "m2.bin"), **kwargs)
    assert {k: v for k, v in again.items() if "file" not in k and k != "model"} == {
        k: v for k, v in metrics.items() if "file" not in k and k != "model"
    }

    fresh = random.Random(99)
    good, spam = _synthetic(fresh, TOPIC, 10), _synthetic(fresh, SPAM, 10)
    step = build_filter(QualityClassifierConfig(model=metrics["model"], threshold=0.5))
    kept, drops = run_filter(step, good + spam)
    assert [d.text for d in kept] == good
    assert drops == {"dropped": 10, "dropped_low_quality_score": 10}
    assert all(d.metadata["quality_score"] >= 0.5 for d in kept)
    scores = [d.metadata["quality_score"] for d in kept]
    step2 = build_filter(QualityClassifierConfig(model=str(tmp_path / "m2.bin"), metadata_key="dclm"))
    kept2, _ = run_filter(step2, good)
    assert [d.metadata["dclm"] for d in kept2] == scores


def test_quality_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="kiln data train-quality"):
        build_filter(QualityClassifierConfig(model=str(tmp_path / "none.bin")))
    model = _tiny_quality_model(tmp_path)
    with pytest.raises(ValueError, match="positive_label 'good' is not in"):
        build_filter(QualityClassifierConfig(model=model, positive_label="good"))
    with pytest.raises(FileNotFoundError, match="negative examples: file not found"):
        train_quality_classifier([str(tmp_path / "pos.jsonl")], [str(tmp_path / "nope.jsonl")], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="valid_fraction"):
        train_quality_classifier([str(tmp_path / "pos.jsonl")], [str(tmp_path / "neg.jsonl")], "x", valid_fraction=1.0)


def _wiki_paragraphs(path) -> list[list[str]]:
    """The wiki demo has one article per line, with paragraph breaks lost ("...utopian.Etymology"): split there."""
    articles = []
    for article in open(path, encoding="utf-8"):
        paras = re.split(r'(?<=[a-z0-9\)\]"][.!?])(?=[A-Z])', article.strip())
        articles.append([p for p in paras if len(p) >= 200])
    return articles


def _c4_chunks(path) -> list[str]:
    """C4 documents cut into chunks of consecutive lines of >= 400 characters (the size of a wiki paragraph)."""
    chunks = []
    for line in open(path, encoding="utf-8"):
        cur = ""
        for text_line in json.loads(line)["text"].split("\n"):
            cur = (cur + "\n" + text_line).strip()
            if len(cur) >= 400:
                chunks.append(cur)
                cur = ""
        if len(cur) >= 200:
            chunks.append(cur)
    return chunks


@pytest.mark.shared_data
def test_train_quality_classifier_wiki_vs_c4(tmp_path):
    """DCLM's recipe in small: reference text (Wikipedia paragraphs) against ordinary web text (C4 chunks)."""
    paras = [p for article in _wiki_paragraphs(shared_file("web/llamafactory_wiki_demo.txt")) for p in article]
    chunks = _c4_chunks(shared_file("web/llamafactory_c4_demo.jsonl"))
    assert (len(paras), len(chunks)) == (1485, 1228)
    # every 30th example stays out of training and goes through the filter afterwards
    wiki_unseen, c4_unseen = paras[5::30], chunks[5::30]
    paras = [p for i, p in enumerate(paras) if i % 30 != 5]
    chunks = [c for i, c in enumerate(chunks) if i % 30 != 5]
    n = min(len(paras), len(chunks))  # balanced classes
    pos = _write_jsonl(tmp_path / "wiki.jsonl", paras[:n])
    neg = _write_jsonl(tmp_path / "c4.jsonl", chunks[:n])
    metrics = train_quality_classifier([pos], [neg], str(tmp_path / "q.bin"), dim=16, bucket=50_000, epoch=15)
    assert (metrics["train_positive"], metrics["train_negative"]) == (1068, 1068)
    assert (metrics["valid_positive"], metrics["valid_negative"]) == (119, 119)
    # measured here: accuracy 0.962, precision 0.966, recall 0.958 (seeds 0-2 at epoch 25: 0.958-0.975)
    assert metrics["accuracy"] >= 0.92 and metrics["precision"] >= 0.9 and metrics["recall"] >= 0.9

    step = build_filter(QualityClassifierConfig(model=metrics["model"]))
    kept, drops = run_filter(step, wiki_unseen + c4_unseen)
    kept_wiki = sum(d.text in wiki_unseen for d in kept)
    kept_c4 = len(kept) - kept_wiki
    assert (len(wiki_unseen), len(c4_unseen)) == (50, 41)
    assert kept_wiki >= 44 and kept_c4 <= 8  # measured: 47 of 50 Wikipedia paragraphs kept, 4 of 41 C4 chunks
    assert drops == {"dropped": 91 - len(kept), "dropped_low_quality_score": 91 - len(kept)}
    assert all(0.0 <= d.metadata["quality_score"] <= 1.0 for d in kept)


def test_normalize_text_and_read_examples(tmp_path):
    assert normalize_text("Hello,  World!\nIt's ﬁne…") == "hello , world ! it ' s fine . . ."
    txt = tmp_path / "a.txt.gz"
    with gzip.open(txt, "wt") as f:
        f.write("first line\n\n second line \n")
    assert list(read_examples(txt)) == ["first line", " second line "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_examples(bad))


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln data")
    filters_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_help_and_missing_file(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train-quality", "--help"])
    help_text = capsys.readouterr().out
    for needle in ("--positive", "--negative", "--output", "--text-key", "quality_classifier", "one example per"):
        assert needle in help_text
    args = parser.parse_args(
        ["train-quality", "--positive", str(tmp_path / "missing.jsonl"), "--negative", "x", "--output", "m.bin"]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "error: positive examples: file not found:" in err and "missing.jsonl" in err


def test_cli_trains_and_prints_metrics(tmp_path, capsys):
    rng = random.Random(5)
    pos = _write_jsonl(tmp_path / "p.jsonl", _synthetic(rng, TOPIC, 50))
    neg1 = _write_jsonl(tmp_path / "n1.jsonl", _synthetic(rng, SPAM, 25))
    neg2 = _write_jsonl(tmp_path / "n2.jsonl", _synthetic(rng, SPAM, 25))
    out = tmp_path / "models" / "q.bin"
    argv = ["train-quality", "--positive", pos, "--negative", neg1, neg2, "--output", str(out)]
    args = _parser().parse_args(argv + ["--dim", "8", "--bucket", "2000", "--epoch", "10"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert out.is_file()
    assert re.search(r"examples \(train\)\s+45 hq / 45 lq", table)
    assert re.search(r"examples \(held out\)\s+5 hq / 5 lq", table)
    assert re.search(r"accuracy\s+1\.0000", table)
    assert re.search(r"precision \(hq\)\s+1\.0000", table)


# ---------------------------------------------------------------- recipe configs


@dataclass
class _Recipe:
    filters: list[FilterConfig] = field(default_factory=list)


def test_configs_from_recipe_mapping():
    recipe = build_dataclass(
        _Recipe,
        {
            "filters": [
                {"kind": "language", "languages": ["en", "fr"], "threshold": 0.5},
                {"kind": "gopher_repetition", "dup_n_grams": {5: 0.2}},
                {"kind": "gopher_quality", "min_doc_words": 10},
                {"kind": "c4", "filter_no_terminal_punct": False},
                {"kind": "fineweb"},
                {"kind": "quality_classifier", "model": "q.bin", "threshold": "1e-1"},
            ]
        },
        source="recipe.yaml",
    )
    kinds = [type(f).__name__ for f in recipe.filters]
    assert kinds == [
        "LanguageConfig",
        "GopherRepetitionConfig",
        "GopherQualityConfig",
        "C4QualityConfig",
        "FineWebQualityConfig",
        "QualityClassifierConfig",
    ]
    assert recipe.filters[1].dup_n_grams == {5: 0.2} and recipe.filters[5].threshold == 0.1


def test_configs_from_yaml_file(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "filters:\n"
        "  - kind: gopher_repetition\n"
        "    top_n_grams: {2: 0.25, 3: 0.2}\n"
        "  - kind: gopher_quality\n"
        "    min_stop_words: null\n"
        "  - kind: language\n"
        "    languages: [fr, de]\n"
    )
    recipe = load_config(_Recipe, recipe_file)
    assert recipe.filters[0].top_n_grams == {2: 0.25, 3: 0.2}
    assert recipe.filters[1].min_stop_words is None
    assert recipe.filters[2] == LanguageConfig(languages=["fr", "de"])
    steps = [build_filter(c) for c in recipe.filters]
    assert steps[0].top_n_grams == ((2, 0.25), (3, 0.2))
    with pytest.raises(ConfigError, match=r"recipe.yaml: key 'filters\[1\].min_stop_word': .*'min_stop_words'"):
        load_config(_Recipe, recipe_file, ["filters.1.min_stop_word=3"])


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"kind": "gopher_quality", "min_doc_word": 3},
            "unknown key for GopherQualityConfig. Did you mean 'min_doc_words'?",
        ),
        ({"kind": "fineweb", "line_punct_treshold": 0.1}, "Did you mean 'line_punct_thr'?"),
        ({"kind": "languag"}, "Did you mean 'language'?"),
        ({"kind": "language", "threshold": 1.5}, "threshold must be in [0, 1], got 1.5"),
        ({"kind": "language", "languages": ["English"]}, "'English' is not a language code"),
        ({"kind": "quality_classifier"}, "missing required key(s): filters[0].model"),
        ({"kind": "quality_classifier", "model": "m.bin", "positive_label": "__label__hq"}, "bare label"),
        ({"kind": "gopher_quality", "min_doc_words": 100, "max_doc_words": 10}, "min_doc_words (100) > max_doc_words"),
        ({"kind": "gopher_repetition", "top_n_grams": {2: 1.5}}, "top_n_grams[2] must be in [0, 1]"),
        ({"kind": "c4", "max_word_length": 0}, "max_word_length must be >= 1"),
        ({"kind": "gopher_quality", "min_doc_words": 0}, "min_doc_words must be >= 1"),
        ({"kind": "gopher_quality", "min_doc_words": None}, "expected an integer, got None"),
        ({"kind": "fineweb", "language": "klingon"}, "no word tokenizer"),
    ],
)
def test_config_errors(entry, message):
    with pytest.raises(ConfigError) as e:
        build_dataclass(_Recipe, {"filters": [entry]}, source="recipe.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("recipe.yaml")
