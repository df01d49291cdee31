"""`kiln data sft RECIPE [key=value ...]`: build the SFT data of a recipe (recipes/sft/). Everything heavy is
imported inside the command, so registering it (every `kiln --help`) costs nothing."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  kiln data sft recipes/sft/hybrid_cpu.yaml
  kiln data sft recipes/sft/hybrid_cpu.yaml data.mix.eta=0.5 data.output_dir=runs/sft/eta05/data
  kiln data sft recipes/sft/hybrid_cpu.yaml --dry-run          # validate, print the sources, build nothing

Reads every source (ShareGPT/AgentInstruct, OpenAI messages with tool calls, Alpaca, raw Human/Assistant
dialogues, SWE-agent and ToolBench trajectories), renders each conversation with the chat template, labels the
assistant turns from that one render (end-of-turn token included, `loss: false` turns excluded), mixes agent and
general data at data.mix.eta, packs best-fit-decreasing into seq_length + 1 tokens and writes
OUTPUT/train (+ heldout/<source>) in the trainer's indexed format with report.json, dropped.jsonl, sample.txt
and tokenizer/ (whose chat template is the one the data was rendered with). Look inside with
`kiln data inspect OUTPUT/train`."""


def register(data_subparsers: argparse._SubParsersAction) -> None:
    p = data_subparsers.add_parser(
        "sft",
        help="build supervised fine-tuning data: mix agent + general chat, label, pack (recipes/sft/)",
        description="Build the SFT data of a recipe's `data` section (AgentTuning-style hybrid mix).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="an SFT recipe YAML (see recipes/sft/) or a shipped recipe's name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides (dotted keys)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and list the sources; build nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from kiln.catalog import resolve_recipe_path
    from kiln.config import ConfigError
    from kiln.data_pipeline.sft.config import load_sft_data_recipe
    from kiln.data_pipeline.sft.readers import expand_paths

    try:
        recipe = load_sft_data_recipe(resolve_recipe_path(args.recipe), args.overrides)
    except ConfigError as e:
        print(f"kiln data sft: error: {e}", file=sys.stderr)
        return 2
    cfg = recipe.data
    if args.dry_run:
        print(f"recipe {recipe.name}: output {cfg.output_dir}, tokenizer {cfg.tokenizer}, template {cfg.template}")
        print(f"mix: eta {cfg.mix.eta} by {cfg.mix.by}, seq_length {cfg.seq_length}, too_long {cfg.too_long}")
        for s in cfg.sources:
            files = expand_paths(s.paths)
            weight = "by size" if s.weight is None else s.weight
            print(f"  {s.name:<24} {s.role:<8} {s.format:<12} weight {weight}  {len(files)} file(s)")
        return 0
    from kiln.data_pipeline.sft.build import build_sft
    from kiln.data_pipeline.sft.report import summary_lines

    try:
        report = build_sft(recipe, progress=not args.quiet)
    except ValueError as e:
        print(f"kiln data sft: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    return 0
