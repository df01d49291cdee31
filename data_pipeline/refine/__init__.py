"""TinyHelen-style simplified-language refinement as a datatrove step (`RefineStep`), configured by
`RefineConfig` (backend: an OpenAI-compatible endpoint or a local `transformers` model)."""

from .backends import EndpointBackend, LocalBackend, RewriteResult, build_backend
from .cache import RewriteCache, cache_key
from .config import DEFAULT_LOCAL_MODEL, GENRES, EndpointBackendConfig, LocalBackendConfig, RefineConfig
from .prompts import build_messages, system_prompt
from .simplicity import lexical_simplicity
from .step import RefineStep, resolve_genre

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "GENRES",
    "EndpointBackend",
    "EndpointBackendConfig",
    "LocalBackend",
    "LocalBackendConfig",
    "RefineConfig",
    "RefineStep",
    "RewriteCache",
    "RewriteResult",
    "build_backend",
    "build_messages",
    "cache_key",
    "lexical_simplicity",
    "resolve_genre",
    "system_prompt",
]
