"""One logging setup for every `kiln` command: the ``kiln`` logger is the root of everything we log
(``kiln.pretrain.checkpoint``, ``kiln.kernels`` ... are its children through ``__name__``), configured once at
the entry point and nowhere else.

Console: INFO and up on rank 0, warnings and errors only on the other ranks of a torchrun job (so a line such as
"attention runs the flash path" appears once per run, not once per rank); ``-v`` shows DEBUG and keeps
third-party output (datatrove's loguru lines, progress bars) on the console. A command that owns a run directory
adds a file handler there with ``log_to_file``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = "kiln"
WARNINGS = "py.warnings"  # the logger logging.captureWarnings writes to
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFormatter(logging.Formatter):
    """``kiln: message`` for INFO, ``kiln: warning: message`` above; a rank prefix under torchrun."""

    def __init__(self, rank_prefix: str):
        super().__init__()
        self.rank_prefix = rank_prefix

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.rank_prefix}kiln: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a test harness swaps it per test)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Configure the ``kiln`` logger for a command line run (idempotent: replaces an earlier console handler)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in [h for h in logger.handlers if getattr(h, "_kiln_console", False)]:
        logger.removeHandler(h)
    rank, world = _rank()
    handler = _StderrHandler(sys.stderr)
    handler._kiln_console = True  # type: ignore[attr-defined]
    handler.setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))
    handler.setFormatter(_ConsoleFormatter(f"[rank {rank}] " if world > 1 and (verbose or rank != 0) else ""))
    logger.addHandler(handler)
    _route_python_warnings(to_console=verbose)
    return logger


def _route_python_warnings(to_console: bool) -> None:
    """Third-party `warnings.warn` lines (megatron-core's "Transformer Engine and Apex are not installed", torch's
    deprecations, once per rank) go to the run's log files, not the console, unless ``-v``."""
    logging.captureWarnings(not to_console)
    py_warnings = logging.getLogger(WARNINGS)
    py_warnings.propagate = False
    if not py_warnings.handlers:
        py_warnings.addHandler(logging.NullHandler())


def is_verbose() -> bool:
    """True under ``kiln -v``: third-party console output (datatrove, sentencepiece) is left on."""
    return logging.getLogger(ROOT).isEnabledFor(logging.DEBUG)


def log_to_file(path: str | os.PathLike) -> Path:
    """Also write every ``kiln`` record the logger lets through (INFO and up; DEBUG under ``-v``) to ``path``,
    whatever the console shows (rank filters included); returns the path. Safe to call twice."""
    path = Path(path).resolve()
    logger = logging.getLogger(ROOT)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    logging.getLogger(WARNINGS).addHandler(handler)
    return path
