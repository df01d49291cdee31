"""`kiln demo`: the end-to-end job on the embedded default corpus (no network, no sample data needed).

Steps: build the corpus from the installed Python packages; run the curation recipe `recipes/data/demo.yaml`
(filters, dedup, MeCo metadata) and print the accounting report; train a sentencepiece tokenizer on the kept
documents; tokenize them into megatron-core indexed datasets, with and without the metadata prefix (MeCo),
and show one document with its loss mask. Later stages (pretraining, instruction tuning) extend this command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # replaced by kiln.catalog below


def cmd_demo(args: argparse.Namespace) -> int:
    from kiln.data_pipeline.cli import load_recipe, show_stats
    from kiln.data_pipeline.runner import run_recipe
    from kiln.demo_corpus import build_corpus

    out = Path(args.output)
    corpus = out / "corpus"
    if args.rebuild_corpus or not any(corpus.glob("part-*.jsonl")):
        n = build_corpus(corpus, max_docs=args.max_docs)
        print(f"kiln demo: built the embedded corpus: {n:,} documents from installed packages -> {corpus}")
    overrides = [f"inputs.0.path={corpus}", f"output_dir={out / 'data'}", *args.overrides]
    recipe = load_recipe(str(RECIPES / "data" / "demo.yaml"), overrides)
    run_recipe(recipe)
    status = show_stats(Path(recipe.output_dir))
    if status:
        return status

    from kiln.data_pipeline.runner import tokens_prefix
    from kiln.data_pipeline.tokenize import TokenizerTrainConfig, inspect_tokenized, train_tokenizer

    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.model").exists():
        cfg = TokenizerTrainConfig(
            inputs=[str(Path(recipe.output_dir) / "output")],
            output_dir=str(tokenizer),
            vocab_size=args.vocab_size,
            num_threads=2,
        )
        train_tokenizer(cfg)
        print(f"kiln demo: trained a {args.vocab_size}-token sentencepiece BPE tokenizer -> {tokenizer}")
    recipe = load_recipe(
        str(RECIPES / "data" / "demo.yaml"), [*overrides, f"tokenize.tokenizer={tokenizer}", "tokenize.meco=true"]
    )
    run_recipe(recipe)  # the curation stages are complete and skipped; only tokenization runs
    prefix = tokens_prefix(recipe)
    print(f"kiln demo: tokenized datasets {prefix}_meco and {prefix}_plain (megatron-core .bin/.idx + loss mask)")
    print(inspect_tokenized(f"{prefix}_meco", n=1)[: args.show_chars])
    return 0


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
    p.add_argument("--vocab-size", type=int, default=4000, help="demo tokenizer vocabulary (default 4000)")
    p.add_argument("--show-chars", type=int, default=1500, help="characters of the decoded sample to print")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo recipe")
    p.set_defaults(func=cmd_demo)
