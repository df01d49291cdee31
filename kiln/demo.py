"""`kiln demo`: the end-to-end job on the embedded default corpus (no network, no sample data needed).

Today it builds the corpus from the installed Python packages and runs the curation recipe
`recipes/data/demo.yaml` on it, then prints the accounting report. Later stages (tokenization, pretraining,
instruction tuning) extend this same command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def cmd_demo(args: argparse.Namespace) -> int:
    from data_pipeline.cli import load_recipe, show_stats
    from data_pipeline.runner import run_recipe
    from kiln.demo_corpus import build_corpus

    out = Path(args.output)
    corpus = out / "corpus"
    if args.rebuild_corpus or not any(corpus.glob("part-*.jsonl")):
        n = build_corpus(corpus, max_docs=args.max_docs)
        print(f"kiln demo: built the embedded corpus: {n:,} documents from installed packages -> {corpus}")
    overrides = [f"inputs.0.path={corpus}", f"output_dir={out / 'data'}", *args.overrides]
    recipe = load_recipe(str(RECIPES / "data" / "demo.yaml"), overrides)
    run_recipe(recipe)
    return show_stats(Path(recipe.output_dir))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end run on the embedded default corpus",
        description=(
            "Builds a corpus from the docstrings and descriptions of the installed Python packages (each document "
            "carries its project's URL) and runs the curation recipe recipes/data/demo.yaml on it. Re-running "
            "resumes: finished work is skipped."
        ),
    )
    p.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--max-docs", type=int, default=20000, help="cap on corpus documents (default 20000)")
    p.add_argument("--rebuild-corpus", action="store_true", help="rebuild the corpus even if it exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo recipe")
    p.set_defaults(func=cmd_demo)
