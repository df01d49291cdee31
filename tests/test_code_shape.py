"""Shape rules of the training stack that review alone would let slip: no function of ``pretrain/`` or
``parallel/`` takes more than five positional arguments (more belong behind ``*`` as keywords, so a call
site says what each value is), and the trainer's loop stays short enough to read in a minute."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_POSITIONAL = 5


def _functions(folder: str):
    for path in sorted((REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node


def test_no_function_takes_more_than_five_positional_arguments():
    offenders = []
    for folder in ("pretrain", "parallel"):
        for path, fn in _functions(folder):
            positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                offenders.append(f"{path}:{fn.lineno} {fn.name}({', '.join(positional)})")
    assert offenders == [], "more than 5 positional arguments:\n" + "\n".join(offenders)


def test_the_training_loop_is_short():
    from kiln.pretrain.trainer import Trainer

    body = [line for line in inspect.getsource(Trainer.fit).splitlines() if line.strip()]
    assert len(body) <= 30, f"Trainer.fit has {len(body)} lines: move features into callbacks"
