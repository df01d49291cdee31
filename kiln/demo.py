"""`kiln demo`: the end-to-end job on the embedded default corpus (no network, no sample data needed).

Stages, each resumable (finished work is skipped on a re-run):
  corpus     build the corpus from the installed Python packages (each document carries its project's URL)
  curate     run the shipped recipe data/demo (filters, dedup, MeCo metadata); print the accounting table
  tokenizer  train a sentencepiece tokenizer on the kept documents
  tokenize   tokenize them into megatron-core indexed datasets, with and without the metadata prefix (MeCo), and
             show one document with its loss mask
Later stages (pretraining, instruction tuning) extend this list.

Console: one line per stage plus the summaries; every stage's full log goes to <output>/logs/ (`-v` shows it all).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STAGES = ("corpus", "curate", "tokenizer", "tokenize")


@dataclass
class StageResult:
    name: str
    path: Path
    figure: str  # the stage's key number, e.g. "1,234 documents kept"
    seconds: float = 0.0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.output)
        self.results: list[StageResult] = []

    def recipe(self, *extra: str):
        from kiln.catalog import find_recipe
        from kiln.data_pipeline.cli import load_recipe
        from kiln.logs import is_verbose

        overrides = [
            f"inputs.0.path={self.out / 'corpus'}",
            f"output_dir={self.out / 'data'}",
            f"progress={'true' if is_verbose() else 'false'}",
            *self.args.overrides,
            *extra,
        ]
        return load_recipe(str(find_recipe("data/demo").path), overrides)

    def corpus(self) -> StageResult:
        from kiln.demo_corpus import build_corpus

        corpus = self.out / "corpus"
        parts = sorted(corpus.glob("part-*.jsonl"))
        if self.args.rebuild_corpus or not parts:
            n = build_corpus(corpus, max_docs=self.args.max_docs)
        else:
            n = sum(sum(1 for _ in p.open("rb")) for p in parts)
        return StageResult("corpus", corpus, f"{n:,} documents from installed packages")

    def curate(self) -> StageResult:
        from kiln.data_pipeline.cli import show_stats
        from kiln.data_pipeline.runner import run_recipe

        recipe = self.recipe()
        run_recipe(recipe)
        status = show_stats(Path(recipe.output_dir))
        if status:
            raise SystemExit(status)
        from kiln.data_pipeline.accounting import build_report

        report = build_report(Path(recipe.output_dir))
        return StageResult("curate", Path(recipe.output_dir) / "output", f"{report.kept:,} documents kept")

    def tokenizer(self) -> StageResult:
        from kiln.data_pipeline.tokenize import TokenizerTrainConfig, train_tokenizer

        tokenizer = self.out / "tokenizer"
        if not (tokenizer / "tokenizer.model").exists():
            cfg = TokenizerTrainConfig(
                inputs=[str(self.out / "data" / "output")],
                output_dir=str(tokenizer),
                vocab_size=self.args.vocab_size,
                num_threads=2,
            )
            train_tokenizer(cfg)
        return StageResult("tokenizer", tokenizer, f"{self.args.vocab_size:,}-token sentencepiece BPE")

    def tokenize(self) -> StageResult:
        from kiln.data_pipeline.runner import run_recipe_tokenize, tokens_prefix
        from kiln.data_pipeline.tokenize import inspect_tokenized
        from kiln.data_pipeline.tokenize.indexed import read_meta

        recipe = self.recipe(f"tokenize.tokenizer={self.out / 'tokenizer'}", "tokenize.meco=true")
        run_recipe_tokenize(recipe)
        prefix = tokens_prefix(recipe)
        print(inspect_tokenized(f"{prefix}_meco", n=1)[: self.args.show_chars].rstrip())
        meta = read_meta(f"{prefix}_meco")
        return StageResult("tokenize", Path(prefix).parent, f"{meta['tokens']:,} tokens (MeCo + plain twins)")

    def _shown(self, path: Path) -> str:
        """Paths relative to the working directory when they are below it, as the user typed the output dir."""
        try:
            return str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    def run(self) -> int:
        stop = STAGES.index(self.args.stop_after) if self.args.stop_after else len(STAGES) - 1
        stages: list[tuple[str, Callable[[], StageResult]]] = [(name, getattr(self, name)) for name in STAGES]
        for i, (name, fn) in enumerate(stages[: stop + 1], start=1):
            print(f"kiln demo [{i}/{stop + 1}] {name} ...", flush=True)
            start = time.perf_counter()
            result = fn()
            result.seconds = time.perf_counter() - start
            self.results.append(result)
            print(f"kiln demo [{i}/{stop + 1}] {name}: {result.figure} ({result.seconds:.1f} s)", flush=True)
        self.summary()
        return 0

    def summary(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"kiln demo: {self.out}")
        for col, justify in (("stage", "left"), ("output", "left"), ("size", "right"), ("time", "right")):
            table.add_column(col, justify=justify)
        table.add_column("key figure")
        for r in self.results:
            table.add_row(r.name, self._shown(r.path), _human(_size(r.path)), f"{r.seconds:.1f} s", r.figure)
        table.caption = f"full logs: {self.out / 'logs'}  (re-run to resume; -v shows everything)"
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # piped or logged: one row per stage rather than rich's 80-column wrap
        console.print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    from kiln.logs import log_to_file

    log_to_file(Path(args.output) / "logs" / "demo.log")
    return Demo(args).run()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end run on the embedded default corpus",
        description=__doc__.split("\n\n", 1)[1].split("\n\nConsole:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--stop-after", choices=STAGES, help="run the stages up to and including this one")
    p.add_argument("--max-docs", type=int, default=20000, help="cap on corpus documents (default 20000)")
    p.add_argument("--rebuild-corpus", action="store_true", help="rebuild the corpus even if it exists")
    p.add_argument("--vocab-size", type=int, default=4000, help="demo tokenizer vocabulary (default 4000)")
    p.add_argument("--show-chars", type=int, default=800, help="characters of the decoded sample to print")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo recipe")
    p.set_defaults(func=cmd_demo)
