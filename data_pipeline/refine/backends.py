"""Rewriting backends: an OpenAI-compatible chat-completions endpoint, and a local `transformers` model.

Both take a batch of chat conversations and return one `RewriteResult` per conversation, in order; a
failure is a result with an `error` reason, never an exception, so that no chunk is silently lost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol

from datatrove.utils.logging import logger

from .config import EndpointBackendConfig, LocalBackendConfig

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class RewriteResult:
    text: str | None  # the model's raw answer; None on failure
    error: str | None = None  # failure reason, e.g. "endpoint_failed: http_500", "too_long_for_context"
    truncated: bool = False  # the answer stopped at the token limit
    attempts: int = 0  # requests / generations spent on it (0 for a cache hit)


class RewriteBackend(Protocol):
    model_id: str  # identifies the model in cache keys; never contains credentials

    def rewrite_batch(self, conversations: list[Messages]) -> list[RewriteResult]: ...


# --- OpenAI-compatible endpoint ----------------------------------------------------------------------------


class EndpointError(Exception):
    def __init__(self, status: str, retryable: bool) -> None:
        super().__init__(status)
        self.status = status
        self.retryable = retryable


def _retryable_http(code: int) -> bool:
    return code in (408, 409, 425, 429) or code >= 500


def chat_completions_url(url: str) -> str:
    """Accept "http://host:port", ".../" or ".../v1" and return the chat-completions URL."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return f"{base}/v1/chat/completions"


def parse_chat_completion(raw: bytes) -> tuple[str, bool]:
    """(content, truncated) from a chat-completions response body; EndpointError("garbage") when malformed."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError("garbage", retryable=True) from None
    if not isinstance(content, str) or not content.strip():
        raise EndpointError("garbage", retryable=True)
    return content, choice.get("finish_reason") == "length"


class EndpointBackend:
    """POST {url}/v1/chat/completions with a thread pool of `concurrency` workers over a batch.

    Retried (at most `max_retries` times, sleeping min(max_backoff_s, backoff_s * 2**i) before retry i): HTTP
    408/409/425/429/5xx, timeouts, connection errors and garbage (invalid JSON, no choices, empty content).
    Other HTTP errors (400, 401, 404, ...) fail at once. The final failure reason is
    ``endpoint_failed: <status>`` with status ``http_<code>``, ``timeout``, ``connection_error`` or ``garbage``.
    """

    def __init__(self, cfg: EndpointBackendConfig) -> None:
        self.cfg = cfg
        self.url = chat_completions_url(cfg.url)
        self.model_id = cfg.model
        self._lock = threading.Lock()
        self.requests_sent = 0

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post_once(self, messages: Messages) -> tuple[str, bool]:
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=self._headers(), method="POST"
        )
        with self._lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            e.close()
            raise EndpointError(f"http_{e.code}", retryable=_retryable_http(e.code)) from None
        except urllib.error.URLError as e:
            timed_out = isinstance(e.reason, TimeoutError)
            raise EndpointError("timeout" if timed_out else "connection_error", retryable=True) from None
        except TimeoutError:
            raise EndpointError("timeout", retryable=True) from None
        except (HTTPException, OSError):
            raise EndpointError("connection_error", retryable=True) from None
        return parse_chat_completion(raw)

    def rewrite(self, messages: Messages) -> RewriteResult:
        attempts = 0
        while True:
            attempts += 1
            try:
                text, truncated = self._post_once(messages)
                return RewriteResult(text, truncated=truncated, attempts=attempts)
            except EndpointError as e:
                if not e.retryable or attempts > self.cfg.max_retries:
                    logger.warning(f"refine: {self.url} failed after {attempts} attempt(s): {e.status}")
                    return RewriteResult(None, error=f"endpoint_failed: {e.status}", attempts=attempts)
                time.sleep(min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (attempts - 1)))

    def rewrite_batch(self, conversations: list[Messages]) -> list[RewriteResult]:
        if not conversations:
            return []
        workers = min(self.cfg.concurrency, len(conversations))
        if workers == 1:
            return [self.rewrite(m) for m in conversations]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refine-endpoint") as pool:
            return list(pool.map(self.rewrite, conversations))


# --- local transformers model ------------------------------------------------------------------------------


def resolve_local_model(model: str) -> tuple[str, str | None]:
    """(folder or model id, gguf file name or None) for `from_pretrained(folder, gguf_file=...)`.

    Accepts a path to a .gguf file, a local model folder, or "<package>/<file>.gguf" naming a file inside an
    installed package (located with importlib, without importing the package).
    """
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    package, sep, rest = model.partition("/")
    if sep and model.endswith(".gguf"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / rest
            if candidate.is_file():
                return str(candidate.parent), candidate.name
        raise FileNotFoundError(f"local model {model!r}: no such file (is the package '{package}' installed?)")
    return model, None  # a Hugging Face id, loaded from the local cache only (no network)


class LocalBackend:
    """Greedy generation with the model's chat template; one chunk at a time.

    A conversation whose prompt plus `max_new_tokens` does not fit in the context fails with
    ``too_long_for_context`` (keep `chunk_tokens` well under the context to avoid it).
    """

    def __init__(self, cfg: LocalBackendConfig) -> None:
        self.cfg = cfg
        self.model_id = f"local:{cfg.model}:max_new_tokens={cfg.max_new_tokens}"
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_tokens: int | None = cfg.context_tokens

    def load(self) -> LocalBackend:
        if self.model is not None:
            return self
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf_file = resolve_local_model(self.cfg.model)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(self.cfg.device).eval()
        if self.context_tokens is None:
            self.context_tokens = int(getattr(self.model.config, "max_position_embeddings", 2048))
        return self

    def count_tokens(self, text: str) -> int:
        self.load()
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def rewrite(self, messages: Messages) -> RewriteResult:
        import torch

        self.load()
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.cfg.device)
        prompt_len = int(inputs["input_ids"].shape[1])
        if prompt_len + self.cfg.max_new_tokens > self.context_tokens:
            return RewriteResult(None, error="too_long_for_context")
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
            )
        new = out[0, prompt_len:].tolist()
        truncated = len(new) >= self.cfg.max_new_tokens and (not new or new[-1] != eos)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return RewriteResult(text, truncated=truncated, attempts=1)

    def rewrite_batch(self, conversations: list[Messages]) -> list[RewriteResult]:
        return [self.rewrite(m) for m in conversations]


def build_backend(cfg: EndpointBackendConfig | LocalBackendConfig) -> EndpointBackend | LocalBackend:
    return EndpointBackend(cfg) if cfg.kind == "endpoint" else LocalBackend(cfg)
