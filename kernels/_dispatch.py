"""Backend selection shared by every kernel entry point: which path runs, and one log line per (op, path)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import weakref

import torch

logger = logging.getLogger("kiln.kernels")

_LOGGED: set[tuple[str, str]] = set()


def log_once(op: str, path: str, reason: str = "") -> None:
    """Log (at INFO) which path ``op`` runs, once per process for each (op, path) pair."""
    key = (op, path)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.info("%s runs the %s path%s", op, path, f" ({reason})" if reason else "")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (it can run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set."""
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and triton_interpret()


def resolve(op: str, backend: str, t: torch.Tensor) -> str:
    """Pick "triton" or "torch" for a pointwise/normalisation kernel and log the choice once.

    "auto": triton on CUDA when importable, else torch. "triton": triton when usable (CUDA, or CPU with
    TRITON_INTERPRET=1), else falls back to torch with the reason logged. "torch" (alias "sdpa"): plain PyTorch.
    """
    if backend not in ("auto", "triton", "torch", "sdpa"):
        raise ValueError(f"unknown backend {backend!r}; expected auto | triton | torch")
    if backend in ("torch", "sdpa"):
        log_once(op, "torch", "requested")
        return "torch"
    if backend == "auto":
        if t.is_cuda and triton_available():
            log_once(op, "triton", "auto on CUDA")
            return "triton"
        log_once(op, "torch", f"auto on {t.device.type}")
        return "torch"
    if triton_usable(t):
        log_once(op, "triton", "requested")
        return "triton"
    log_once(op, "torch", f"triton requested but unavailable on {t.device.type} (set TRITON_INTERPRET=1 on CPU)")
    return "torch"


# Per-batch metadata derived from segment ids (document extents, cu_seqlens) is the same for every layer of a
# step; computing it needs a device->host sync (torch.unique / nonzero), so it is memoised on the segment-ids
# tensor object (and its in-place version counter). A few entries: one batch in flight, plus eval/decoding.
_META_CACHE: dict[tuple[int, str], tuple[weakref.ref, int, object]] = {}
_META_CACHE_SIZE = 8


def cached_on(t: torch.Tensor, key: str, fn):
    """``fn()``, memoised while ``t`` (the same tensor object, unmodified) is alive."""
    ck = (id(t), key)
    hit = _META_CACHE.get(ck)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = fn()
    if len(_META_CACHE) >= _META_CACHE_SIZE:
        _META_CACHE.pop(next(iter(_META_CACHE)))
    _META_CACHE[ck] = (weakref.ref(t), t._version, value)
    return value
