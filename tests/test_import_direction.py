"""Imports between the model and its parallelisation run one way (issue 9): ``kiln.parallel`` uses the model,
the model never imports ``kiln.parallel``, and ``kiln.parallel`` does not reach into the trainer (recipe, engine,
loop, checkpoints, callbacks). Checked on the source with ``ast``, so a lazy import inside a function counts."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# kiln.X -> folder, as pyproject's package-dir maps them
FOLDERS = {"kiln.pretrain": "pretrain", "kiln.parallel": "parallel"}

TRAINER = (
    "kiln.pretrain.recipe",
    "kiln.pretrain.engine",
    "kiln.pretrain.train",
    "kiln.pretrain.trainer",
    "kiln.pretrain.checkpoint",
    "kiln.pretrain.checkpointing",
    "kiln.pretrain.callbacks",
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    package = next(k for k, v in FOLDERS.items() if rel.parts[0] == v)
    parts = [package, *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (top level or inside functions), relative imports resolved; for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_model_does_not_import_kiln_parallel():
    for rel in ("pretrain/model.py", "pretrain/config.py"):
        bad = sorted(m for m in imported_modules(REPO / rel) if _within(m, "kiln.parallel"))
        assert bad == [], f"{rel} imports {bad}"


def test_kiln_parallel_does_not_import_the_trainer():
    files = sorted((REPO / "parallel").rglob("*.py"))
    assert len(files) >= 5  # __init__, layout, parallelize, tensor_parallel, pipeline, topology
    for path in files:
        bad = sorted(m for m in imported_modules(path) if any(_within(m, t) for t in TRAINER))
        assert bad == [], f"{path.relative_to(REPO)} imports {bad}"


def test_the_scanner_sees_lazy_imports():
    """The checks above would pass vacuously if the scanner missed imports; show it finds the usual forms."""
    src = REPO / "parallel" / "parallelize.py"
    found = imported_modules(src)
    assert {"kiln.parallel.tensor_parallel", "kiln.pretrain.model"} <= found  # imported inside parallelize()
    assert "kiln.pretrain.recipe" in imported_modules(REPO / "pretrain" / "engine" / "core.py")
    assert not _within("kiln.pretrain.checkpointing", "kiln.pretrain.checkpoint")
