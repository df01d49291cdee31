"""RefineStep with the endpoint backend against a real HTTP server on loopback that fails on purpose.

The server decides what to do from the "Story number <n>" marker in the chunk and how many requests it has
already seen for that n, so every run is deterministic whatever the thread scheduling.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from datatrove.data import Document

from kiln.data_pipeline.refine import EndpointBackendConfig, RefineConfig, RefineStep, RewriteCache, lexical_simplicity
from kiln.data_pipeline.refine.backends import EndpointError, chat_completions_url, parse_chat_completion

SECRET = "s3cret-token-xyz"
STALL_S = 1.5  # the server's stall; the client gives up after TIMEOUT_S
TIMEOUT_S = 0.75
MAX_RETRIES = 3

# n -> what the server does on its 1st, 2nd, ... request for that n (the last action repeats).
SCRIPT: dict[int, list[str]] = {
    1: ["ok"],
    2: ["429", "429", "ok"],
    3: ["500", "garbage", "ok"],
    4: ["stall", "ok"],
    5: ["no_choices", "502", "empty", "ok"],
    6: ["500"],
    7: ["stall"],
    8: ["garbage"],
    9: ["400"],
    10: ["complex"],
    11: ["short"],
    14: ["truncated"],
}
COMPLEX = (
    "The quintessential epistemological ramifications of anarchism notwithstanding, the proletariat remained "
    "unconvinced by Proudhon and his ideological successors."
)


def simple_reply(n: int) -> str:
    return (
        "This is a short and simple story about a dog and a boy. They play in the park every day and they "
        f"are very happy. Story number {n}."
    )


def doc_text(n: int) -> str:
    return (
        "This is a story about a small town and the people who live there. "
        f"Story number {n}. Everyone in the town knows each other and they help when someone needs it."
    )


class ScriptedServer:
    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions"
                n = int(re.search(r"Story number (\d+)", body["messages"][-1]["content"]).group(1))
                with server.lock:
                    attempt = server.counts[n]
                    server.counts[n] += 1
                    server.auth.add(self.headers.get("Authorization", ""))
                script = SCRIPT[n]
                action = script[min(attempt, len(script) - 1)]
                try:
                    self._act(action, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _completion(self, content: str | None, finish: str = "stop") -> bytes:
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                return json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()

            def _act(self, action: str, n: int) -> None:
                if action in ("400", "429", "500", "502"):
                    self._send(int(action), b'{"error": {"message": "scripted failure"}}')
                elif action == "stall":
                    time.sleep(STALL_S)
                    self._send(200, self._completion(simple_reply(n)))
                elif action == "garbage":
                    self._send(200, b"<html>not json{")
                elif action == "no_choices":
                    self._send(200, b'{"id": "x", "object": "chat.completion"}')
                elif action == "empty":
                    self._send(200, self._completion(None))
                elif action == "complex":
                    self._send(200, self._completion(f"{COMPLEX} Story number {n}."))
                elif action == "short":
                    self._send(200, self._completion(f"A dog. Story number {n}."))
                elif action == "truncated":
                    self._send(200, self._completion(f"{simple_reply(n)} And then the dog", finish="length"))
                else:
                    self._send(200, self._completion(f"Here is the rewritten text:\n{simple_reply(n)}"))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def snapshot(self) -> Counter[int]:
        with self.lock:
            return Counter(self.counts)


@pytest.fixture
def server():
    srv = ScriptedServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def make_docs(ns=None) -> list[Document]:
    docs = [Document(text=doc_text(n), id=f"doc{n}", metadata={"genre": "web"}) for n in SCRIPT]
    docs.append(Document(text="Story number 12. Too short.", id="doc12"))
    docs.append(Document(text=doc_text(1), id="doc13"))  # an exact duplicate of doc1
    docs.sort(key=lambda d: int(d.id[3:]))
    return [d for d in docs if ns is None or int(d.id[3:]) in ns]


def make_step(url: str, cache_dir, retry_failed: bool = False) -> RefineStep:
    backend = EndpointBackendConfig(
        url=url + "/v1/",
        model="tiny-test-model",
        api_key_env="KILN_REFINE_TEST_KEY",
        concurrency=4,
        max_retries=MAX_RETRIES,
        timeout_s=TIMEOUT_S,
        backoff_s=0.01,
        max_backoff_s=0.05,
    )
    return RefineStep(
        RefineConfig(backend=backend, genre="auto", cache_dir=str(cache_dir), batch_size=8, retry_failed=retry_failed)
    )


EXPECTED = {  # doc id -> (status, reason)
    "doc1": ("rewritten", "ok"),
    "doc2": ("rewritten", "ok"),
    "doc3": ("rewritten", "ok"),
    "doc4": ("rewritten", "ok"),
    "doc5": ("rewritten", "ok"),
    "doc6": ("kept_original", "endpoint_failed: http_500"),
    "doc7": ("kept_original", "endpoint_failed: timeout"),
    "doc8": ("kept_original", "endpoint_failed: garbage"),
    "doc9": ("kept_original", "endpoint_failed: http_400"),
    "doc10": ("kept_original", "not_simple"),
    "doc11": ("kept_original", "too_short"),
    "doc14": ("rewritten", "ok"),
}
# requests per n in the first run: successes after k failures cost k+1; permanent failures cost 1+MAX_RETRIES
# except the non-retryable 400.
FIRST_RUN_REQUESTS = {1: 1, 2: 3, 3: 3, 4: 2, 5: 4, 6: 4, 7: 4, 8: 4, 9: 1, 10: 1, 11: 1, 14: 1}
FAILED = {6, 7, 8, 9}


def check_outputs(out: list[Document]) -> None:
    assert [d.id for d in out] == list(EXPECTED)
    for d in out:
        refine = d.metadata["refine"]
        assert (refine["status"], refine["reason"]) == EXPECTED[d.id], d.id
        n = int(d.id[3:])
        (chunk,) = refine["chunks"]
        assert d.metadata["simplicity"] == lexical_simplicity(d.text) == refine["simplicity_after"]
        assert refine["simplicity_before"] == chunk["simplicity_before"] == lexical_simplicity(doc_text(n))
        if refine["status"] == "rewritten":
            assert d.text == simple_reply(n)  # preamble stripped; the truncated tail of doc14 trimmed
            assert chunk["simplicity_after"] == 1.0
        else:
            assert d.text == doc_text(n)
        if n in FAILED:
            assert chunk["simplicity_after"] is None
        assert SECRET not in json.dumps(d.metadata)
    by_id = {d.id: d.metadata["refine"]["chunks"][0] for d in out}
    assert by_id["doc10"]["simplicity_after"] == 8 / 19
    assert by_id["doc11"]["simplicity_after"] == 1.0


def test_endpoint_retries_failures_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_REFINE_TEST_KEY", SECRET)
    cache_dir = tmp_path / "cache"
    t0 = time.monotonic()

    step = make_step(server.url, cache_dir)
    out = list(step.run(iter(make_docs())))
    check_outputs(out)
    assert dict(server.snapshot()) == FIRST_RUN_REQUESTS
    assert server.total() == 29
    assert server.auth == {f"Bearer {SECRET}"}
    stats = {k: v.total for k, v in step.stats.stats.items()}
    assert stats["total"] == 14
    assert stats["forwarded"] == 12
    assert stats["dropped"] == 2 and stats["dropped_too_short"] == 1 and stats["dropped_duplicate"] == 1
    assert stats["docs_rewritten"] == 6 and stats["docs_kept_original"] == 6
    assert stats["docs_kept_original_endpoint_failed_http_500"] == 1
    assert stats["chunks"] == 14
    assert stats["chunks_rewritten"] == 6 and stats["chunks_kept_original"] == 6
    assert stats["chunks_dropped_too_short"] == 1 and stats["chunks_dropped_duplicate"] == 1
    assert stats["chunks_kept_original_endpoint_failed_timeout"] == 1
    assert stats["chunks_kept_original_not_simple"] == 1 and stats["chunks_kept_original_too_short"] == 1
    assert stats["llm_calls"] == 29
    assert "chunks_cache_hits" not in stats

    # 8 successful answers and 4 final failures (with their reason) are cached, never the key
    cache_files = sorted(cache_dir.glob("*/*.json"))
    assert len(cache_files) == len(RewriteCache(cache_dir)) == 12
    entries = [json.loads(f.read_text()) for f in cache_files]
    assert sum(e.get("error") is not None for e in entries) == 4
    for f, entry in zip(cache_files, entries):
        assert entry["model"] == "tiny-test-model" and SECRET not in f.read_text()

    # second run over the same documents: the cache answers everything, the server sees zero requests
    before_total = server.total()
    step2 = make_step(server.url, cache_dir)
    check_outputs(list(step2.run(iter(make_docs()))))
    assert server.total() == before_total
    assert step2.stats.stats["chunks_cache_hits"].total == 8
    assert step2.stats.stats["chunks_cached_failures"].total == 4
    assert "llm_calls" not in step2.stats.stats or step2.stats.stats["llm_calls"].total == 0

    # retry_failed: only the failed chunks are sent again, with the same bounded retries
    before = server.snapshot()
    step_retry = make_step(server.url, cache_dir, retry_failed=True)
    check_outputs(list(step_retry.run(iter(make_docs()))))
    spent = server.snapshot() - before
    assert dict(spent) == {6: 4, 7: 4, 8: 4, 9: 1}
    assert step_retry.stats.stats["chunks_cache_hits"].total == 8

    # a run over only the documents whose rewrite is cached: the server sees zero requests
    before_total = server.total()
    step3 = make_step(server.url, cache_dir)
    out3 = list(step3.run(iter(make_docs(ns={1, 2, 3, 4, 5, 10, 11, 14}))))
    assert server.total() == before_total
    assert [d.metadata["refine"]["status"] for d in out3] == ["rewritten"] * 5 + ["kept_original"] * 2 + ["rewritten"]
    assert time.monotonic() - t0 < 20


def test_endpoint_without_cache_and_rewrite_disabled(server, tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_REFINE_TEST_KEY", raising=False)
    cfg = RefineConfig(
        backend=EndpointBackendConfig(url=server.url, model="m", api_key_env="KILN_REFINE_TEST_KEY", max_retries=0),
        enabled_rewrite=False,
        cache_dir=str(tmp_path / "unused"),
    )
    step = RefineStep(cfg)
    out = list(step.run(iter(make_docs(ns={1, 2, 6}))))
    assert server.total() == 0 and not (tmp_path / "unused").exists()
    assert [(d.metadata["refine"]["status"], d.metadata["refine"]["reason"]) for d in out] == [
        ("kept_original", "rewrite_disabled")
    ] * 3
    assert [d.metadata["refine"]["chunks"][0]["simplicity_after"] for d in out] == [None] * 3

    # no key in the environment: no Authorization header; max_retries=0 means exactly one request per chunk
    cfg.enabled_rewrite = True
    cfg.cache_dir = None
    step = RefineStep(cfg)
    out = list(step.run(iter(make_docs(ns={2, 6}))))
    assert [d.metadata["refine"]["reason"] for d in out] == ["endpoint_failed: http_429", "endpoint_failed: http_500"]
    assert dict(server.snapshot()) == {2: 1, 6: 1}
    assert server.auth == {""}


def test_chat_completions_url_and_parsing():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    body = {"choices": [{"message": {"content": "Hi there."}, "finish_reason": "length"}]}
    assert parse_chat_completion(json.dumps(body).encode()) == ("Hi there.", True)
    for bad in (b"nope", b"{}", b'{"choices": []}', b'{"choices": [{"message": {"content": "  "}}]}'):
        with pytest.raises(EndpointError) as e:
            parse_chat_completion(bad)
        assert e.value.status == "garbage" and e.value.retryable
