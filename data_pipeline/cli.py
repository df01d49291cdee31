"""`kiln data ...`: the curation CLI. Heavy imports happen inside the command functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.commands import register_modules

# Subpackages that add their own `kiln data` commands through `register(data_subparsers)`.
DATA_COMMAND_MODULES = (
    "kiln.data_pipeline.filters.cli",
    "kiln.data_pipeline.tokenize.cli",
    "kiln.data_pipeline.sft.cli",
)


def load_recipe(path: str, overrides: list[str], executor: str | None = None, tasks: int | None = None):
    from kiln.config import load_config
    from kiln.data_pipeline.recipe import DataRecipe

    extra = list(overrides)
    if executor:
        extra.append(f"executor.kind={executor}")
    if tasks:
        extra.append(f"executor.tasks={tasks}")
    return load_config(DataRecipe, path, extra)


def cmd_run(args: argparse.Namespace) -> int:
    from kiln.data_pipeline.runner import build_stages, run_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.executor, args.tasks)
    if args.dry_run:
        for stage in build_stages(recipe):
            steps = ", ".join(type(s).__name__ for s in stage.pipeline)
            print(f"stage {stage.name} ({stage.tasks} tasks): {steps}")
        return 0
    executors = run_recipe(recipe)
    if recipe.executor.kind == "slurm":
        for ex in executors:
            print(
                f"submitted {ex.job_name}: job {ex.job_id}, script {Path(ex.logging_dir.path) / 'launch_script.slurm'}"
            )
        print(f"when the jobs finish: kiln data stats {recipe.output_dir}")
        return 0
    return show_stats(Path(recipe.output_dir))


def show_stats(run_dir: Path) -> int:
    from rich.console import Console

    from kiln.data_pipeline.accounting import build_report
    from kiln.data_pipeline.report import build_table, write_report

    report = build_report(run_dir)
    Console().print(build_table(report))
    files = write_report(report, run_dir / "report")
    print(f"report: {files['png']}  {files['html']}  {files['json']}")
    return 0 if report.balanced and not report.incomplete_stages else 1


def cmd_stats(args: argparse.Namespace) -> int:
    return show_stats(Path(args.run_dir))


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if Path(f"{path}.idx").exists():
        from kiln.data_pipeline.tokenize import inspect_tokenized

        # the tokenizer defaults to the one recorded in the dataset's .meta.json; colour by default on a terminal
        color = sys.stdout.isatty() if args.color is None else args.color
        print(inspect_tokenized(str(path), args.tokenizer, n=args.n, start=args.start, color=color))
        return 0
    from kiln.data_pipeline.inspect_output import inspect_path

    print(
        inspect_path(
            path,
            n=args.n,
            reason=args.reason,
            grep=args.grep,
            sample=args.sample,
            seed=args.seed,
            max_chars=args.max_chars,
        )
    )
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="curation: run recipes, report, inspect, train tokenizers and quality classifiers",
        description="Curation pipeline commands. Recipes live in recipes/data/.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda _args: data.print_help() or 2)

    run = sub.add_parser(
        "run",
        help="run (or resume) a data recipe",
        description=(
            "Run a curation recipe: read -> quality filters -> dedup, with datatrove's executors. Re-running the "
            "same command resumes: finished tasks are skipped, unfinished ones redone. Overrides use dotted keys, "
            "e.g. `kiln data run recipes/data/web.yaml executor.tasks=8 dedup.minhash.buckets=20`."
        ),
    )
    run.add_argument("recipe", help="path to a recipe YAML (see recipes/data/)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (dotted keys)")
    run.add_argument("--executor", choices=["local", "ray", "slurm"], help="override executor.kind")
    run.add_argument("--tasks", type=int, help="override executor.tasks (number of shards)")
    run.add_argument("--dry-run", action="store_true", help="validate the recipe, print the stages, run nothing")
    run.set_defaults(func=cmd_run)

    stats = sub.add_parser(
        "stats",
        help="accounting report of a run (table, PNG, HTML)",
        description="Counts every document of a run by outcome: kept, dropped by step and reason, rejected.",
    )
    stats.add_argument("run_dir", help="the output_dir of a `kiln data run`")
    stats.set_defaults(func=cmd_stats)

    insp = sub.add_parser(
        "inspect",
        help="look at samples of any stage's output, tokenized datasets included",
        description=(
            "Show records from a run directory, a folder of shards (output/, excluded/<step>/, rejects/input0/), a "
            "single .jsonl(.gz) file, or a tokenized dataset prefix (PREFIX.bin/.idx, e.g. tokens/web_meco): its "
            "documents decoded, with the tokens that carry no loss wrapped in ⟦...⟧ (dimmed with --color)."
        ),
    )
    insp.add_argument("path")
    insp.add_argument("-n", type=int, default=5, help="number of records (default 5)")
    insp.add_argument("--reason", help="only records dropped/rejected for this reason")
    insp.add_argument("--grep", help="only records whose text contains this string")
    insp.add_argument("--sample", action="store_true", help="uniform random sample instead of the first N")
    insp.add_argument("--seed", type=int, default=0)
    insp.add_argument("--max-chars", type=int, default=800, help="truncate each text (default 800)")
    tokenized = insp.add_argument_group("tokenized datasets")
    tokenized.add_argument("-t", "--tokenizer", help="tokenizer to decode with (default: the one in PREFIX.meta.json)")
    tokenized.add_argument("--start", type=int, default=0, help="first document (default 0)")
    tokenized.add_argument(
        "--color",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dim no-loss tokens with ANSI colours instead of ⟦...⟧ (default: on a terminal)",
    )
    insp.set_defaults(func=cmd_inspect)

    register_modules(sub, DATA_COMMAND_MODULES)
