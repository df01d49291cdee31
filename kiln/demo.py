"""`kiln demo`: the end-to-end job on the embedded default corpus (no network, no sample data needed).

Stages, each resumable (finished work is skipped on a re-run):
  corpus        build the corpus from the installed Python packages (each document carries its project's URL),
                or read your own raw text (--data DIR)
  curate        run the shipped recipe data/demo (filters, dedup, MeCo metadata); print the accounting table
  tokenizer     train a sentencepiece tokenizer on the kept documents
  tokenize      tokenize them into megatron-core indexed datasets, with and without the metadata prefix (MeCo),
                and show one document with its loss mask
  pretrain      `torchrun --nproc-per-node 4 -m kiln train pretrain/demo`: a small Llama on 4 gloo ranks at
                TP2 x PP2, MeCo metadata conditioning then the plain-text cooldown
  curve         its training and held-out loss curves as a PNG (`kiln plot`)
  agent_data    `kiln agent gen`: expert ReAct trajectories on TextWorld games generated offline
  general_data  instruction / answer pairs made from the curated documents (continue the text; name its website)
  sft_data      `kiln data sft sft/demo`: the hybrid agent + general mix in ChatML, labelled and packed
  sft           `kiln train sft/demo` from the last pretraining checkpoint
  export        `kiln export-hf`: the tuned model as a Hugging Face directory, with the SFT build's tokenizer
  generate      `transformers` loads it and continues a prompt without and with a MeCo `URL: <host>` prefix
  agent_eval    `kiln agent eval` on TextWorld games of unseen seeds: success rate, invalid actions

Console: one line per stage plus the summaries; every stage's full log goes to <output>/logs/ (`-v` shows it all).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.config import ConfigError

STAGES = (
    "corpus", "curate", "tokenizer", "tokenize", "pretrain", "curve", "agent_data", "general_data", "sft_data", "sft",
    "export", "generate", "agent_eval",
)  # fmt: skip
# The stages after tokenize live in their own modules, as functions of the Demo.
STAGE_MODULES = {
    "pretrain": "kiln.demo_train", "curve": "kiln.demo_train", "agent_data": "kiln.demo_sft",
    "general_data": "kiln.demo_sft", "sft_data": "kiln.demo_sft", "sft": "kiln.demo_sft",
    "export": "kiln.demo_export", "generate": "kiln.demo_export", "agent_eval": "kiln.demo_export",
}  # fmt: skip
MARKER = "demo_stage.json"  # written into a stage's output once it is complete: a re-run skips the stage


@dataclass(frozen=True)
class Scale:
    """How big each stage runs: the full demo (under 15 minutes on 2 CPU cores) or --quick (CI, a few minutes)."""

    name: str
    max_docs: int  # cap on corpus documents (the embedded corpus holds about 2,500 on a typical environment)
    pretrain_steps: int
    pretrain_eval_interval: int
    pretrain_checkpoint_interval: int
    pretrain_log_interval: int
    agent_kinds: str  # `kiln agent gen` game kinds and seeds of the trajectories
    agent_seeds: str
    sft_steps: int
    sft_eval_interval: int
    sft_checkpoint_interval: int
    sft_log_interval: int
    eval_kinds: str  # `kiln agent eval` games: kinds and seeds (unseen: gen's seeds start at 0, these at 1000)
    eval_seeds: str
    eval_max_steps: int
    eval_new_tokens: int  # tokens generated per action


FULL = Scale(
    "full",
    max_docs=20000,
    pretrain_steps=150,
    pretrain_eval_interval=25,
    pretrain_checkpoint_interval=50,
    pretrain_log_interval=10,
    agent_kinds="tiny,small",
    agent_seeds="0-29",
    sft_steps=200,  # measured: 60 steps leave the replies unparsable, 200 give "Thought: ...\nAction: go east"
    sft_eval_interval=50,
    sft_checkpoint_interval=100,
    sft_log_interval=20,
    eval_kinds="tiny,small",
    eval_seeds="1000-1004",
    eval_max_steps=8,
    eval_new_tokens=48,
)
QUICK = Scale(
    "quick",
    max_docs=600,
    pretrain_steps=20,
    pretrain_eval_interval=10,
    pretrain_checkpoint_interval=10,
    pretrain_log_interval=5,
    agent_kinds="tiny,small",
    agent_seeds="0-3",
    sft_steps=4,
    sft_eval_interval=2,
    sft_checkpoint_interval=2,
    sft_log_interval=2,
    eval_kinds="tiny",
    eval_seeds="1000-1001",
    eval_max_steps=3,
    eval_new_tokens=32,
)

# The suffixes --data recognises, and the curation reader each one needs (compression suffixes are looked past).
_DATA_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".warc": "warc", ".txt": "text"}
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


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


def data_kind(folder: Path) -> str:
    """The reader for the user's raw text: every file of the folder must be one kind (JSONL, Parquet, WARC or
    plain text, possibly compressed), so that one curation input reads them all."""
    if not folder.is_dir():
        raise ConfigError(f"--data {folder}: not a folder (give a folder of .jsonl, .parquet, .warc or .txt files)")
    kinds: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith((".", "_")) for part in rel.parts):
            continue  # the same files the curation reader skips
        suffixes = [s for s in path.suffixes if s not in _COMPRESSED]
        kind = _DATA_KINDS.get(suffixes[-1] if suffixes else "", "unknown")
        kinds.setdefault(kind, []).append(str(rel))
    if not kinds:
        raise ConfigError(f"--data {folder}: the folder holds no files")
    if len(kinds) > 1 or "unknown" in kinds:
        found = "; ".join(f"{kind}: {', '.join(files[:3])}" for kind, files in sorted(kinds.items()))
        raise ConfigError(
            f"--data {folder}: expected files of one kind (.jsonl, .json, .parquet, .warc or .txt, optionally .gz "
            f"/ .zst), found {found}"
        )
    return next(iter(kinds))


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.output)
        self.scale = QUICK if args.quick else FULL
        self.max_docs = args.max_docs if args.max_docs is not None else self.scale.max_docs
        self.data = Path(args.data) if args.data else None
        self.results: list[StageResult] = []

    # ---- bookkeeping shared by the stages

    def settings(self) -> dict:
        """What the run directory was made with: a re-run must match it, or the stages it skips would belong to
        another run (a --quick pretraining resumed by the full demo, another corpus's tokenizer)."""
        return {
            "scale": self.scale.name,
            "data": str(self.data.resolve()) if self.data else None,
            "vocab_size": self.args.vocab_size,
        }

    def check_settings(self) -> None:
        path = self.out / "demo.json"
        wanted = self.settings()
        if path.is_file():
            made = json.loads(path.read_text())
            if made != wanted:
                diff = ", ".join(f"{k} {made.get(k)!r} (now {v!r})" for k, v in wanted.items() if made.get(k) != v)
                raise ConfigError(
                    f"{self.out} was made by another demo run ({diff}): re-run with the same options to resume, "
                    "or give another --output"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(wanted, indent=2) + "\n")

    def finished(self, name: str, path: Path) -> StageResult | None:
        """The stage's result when its output is complete (its marker written), else None."""
        marker = path / MARKER
        if not marker.is_file():
            return None
        return StageResult(name, path, json.loads(marker.read_text())["figure"] + " (resumed)")

    def finish(self, name: str, path: Path, figure: str) -> StageResult:
        tmp = path / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"figure": figure, "scale": self.scale.name}) + "\n")
        tmp.replace(path / MARKER)  # atomic: a killed demo never leaves a marker for unfinished work
        return StageResult(name, path, figure)

    def last_checkpoint(self, stage: str) -> Path:
        """The last complete checkpoint of a training stage's run directory (where the next stage starts)."""
        from kiln.pretrain.checkpoint import find_latest_checkpoint

        folder = self.out / stage / "checkpoints"
        ckpt = find_latest_checkpoint(folder)
        if ckpt is None:
            raise ConfigError(f"no complete checkpoint under {folder}: re-run the demo")
        return ckpt

    def log(self, stage: str) -> str:
        """Where a stage's command writes its output, as the console shows it."""
        return self.shown(self.out / "logs" / f"{stage}.log")

    def execute(self, stage: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Run one of kiln's own commands as a user would, its whole output in <output>/logs/<stage>.log; a failure
        is one error naming the command, the log and its last lines."""
        log = Path(self.log(stage))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ConfigError(
                f"demo stage {stage}: `{shlex.join(cmd)}` exited with status {proc.returncode}; full log {log}, "
                f"last lines:\n{tail}"
            )

    def recipe(self, *extra: str):
        from kiln.catalog import find_recipe
        from kiln.data_pipeline.cli import load_recipe
        from kiln.logs import is_verbose

        if self.data is not None:
            inputs = [f"inputs.0.path={self.data}", f"inputs.0.kind={data_kind(self.data)}", "inputs.0.glob=null"]
        else:
            inputs = [f"inputs.0.path={self.out / 'corpus'}"]
        overrides = [
            *inputs,
            f"output_dir={self.out / 'data'}",
            f"progress={'true' if is_verbose() else 'false'}",
            *self.args.overrides,
            *extra,
        ]
        return load_recipe(str(find_recipe("data/demo").path), overrides)

    def tokens_prefix(self) -> str:
        from kiln.data_pipeline.runner import tokens_prefix

        return tokens_prefix(self.recipe(f"tokenize.tokenizer={self.out / 'tokenizer'}", "tokenize.meco=true"))

    # ---- the stages

    def corpus(self) -> StageResult:
        if self.data is not None:
            kind = data_kind(self.data)
            files = [p for p in self.data.rglob("*") if p.is_file()]
            return StageResult("corpus", self.data, f"your {kind} data: {len(files):,} files")
        from kiln.demo_corpus import build_corpus

        corpus = self.out / "corpus"
        parts = sorted(corpus.glob("part-*.jsonl"))
        if self.args.rebuild_corpus or not parts:
            n = build_corpus(corpus, max_docs=self.max_docs)
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
        from kiln.data_pipeline.runner import run_recipe_tokenize
        from kiln.data_pipeline.tokenize import inspect_tokenized
        from kiln.data_pipeline.tokenize.indexed import read_meta

        recipe = self.recipe(f"tokenize.tokenizer={self.out / 'tokenizer'}", "tokenize.meco=true")
        run_recipe_tokenize(recipe)
        prefix = self.tokens_prefix()
        print(inspect_tokenized(f"{prefix}_meco", n=1)[: self.args.show_chars].rstrip())
        meta = read_meta(f"{prefix}_meco")
        return StageResult("tokenize", Path(prefix).parent, f"{meta['tokens']:,} tokens (MeCo + plain twins)")

    # ---- the run

    def shown(self, path: Path) -> str:
        """Paths relative to the working directory when they are below it, as the user typed the output dir."""
        try:
            return str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    def stage(self, name: str) -> Callable[[], StageResult]:
        if name in STAGE_MODULES:
            return functools.partial(getattr(importlib.import_module(STAGE_MODULES[name]), name), self)
        return getattr(self, name)

    def run(self) -> int:
        self.check_settings()
        stop = STAGES.index(self.args.stop_after) if self.args.stop_after else len(STAGES) - 1
        stages: list[tuple[str, Callable[[], StageResult]]] = [(name, self.stage(name)) for name in STAGES]
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
            table.add_row(r.name, self.shown(r.path), _human(_size(r.path)), f"{r.seconds:.1f} s", r.figure)
        total = sum(r.seconds for r in self.results)
        table.caption = (
            f"total {total / 60:.1f} min ({self.scale.name}); full logs: {self.out / 'logs'}  (re-run to resume; "
            "-v shows everything)"
        )
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)  # piped or logged: one row per stage rather than rich's 80-column wrap
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
    p.add_argument(
        "--quick", action="store_true", help="every stage at a smaller size (fewer documents and steps): what CI runs"
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="your own raw text instead of the embedded corpus: a folder of .jsonl (a 'text' field, optionally "
        "'url' for MeCo), .parquet, .warc or .txt (one document per line) files",
    )
    p.add_argument(
        "--max-docs", type=int, default=None, help="cap on embedded corpus documents (default 20000; 600 with --quick)"
    )
    p.add_argument("--rebuild-corpus", action="store_true", help="rebuild the corpus even if it exists")
    p.add_argument("--vocab-size", type=int, default=4000, help="demo tokenizer vocabulary (default 4000)")
    p.add_argument("--show-chars", type=int, default=800, help="characters of the decoded sample to print")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo's curation recipe")
    p.set_defaults(func=cmd_demo)
