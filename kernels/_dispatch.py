"""Backend selection shared by every kernel entry point: which path runs, and one log line per (op, path)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

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
