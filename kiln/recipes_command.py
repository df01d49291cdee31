"""`kiln recipes list` / `kiln recipes show NAME`: the recipes shipped inside the package."""

from __future__ import annotations

import argparse


def cmd_list(args: argparse.Namespace) -> int:
    from kiln.catalog import list_recipes

    entries = [e for e in list_recipes() if not args.kind or e.kind == args.kind]
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        print(f"{e.name:<{width}}  {e.summary}")
    print(f"\n{len(entries)} recipes; `kiln recipes show NAME` prints one, `kiln recipes show NAME --path` its file.")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from kiln.catalog import find_recipe

    entry = find_recipe(args.name)
    print(entry.path if args.path else entry.path.read_text(encoding="utf-8"), end="" if not args.path else "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recipes",
        help="list and show the recipes shipped with kiln",
        description="The recipes shipped inside the package (data/, pretrain/, sft/). Any command that takes a "
        "recipe file also takes a shipped recipe's name, e.g. `kiln train pretrain/tiny`.",
    )
    sub = p.add_subparsers(dest="recipes_command", metavar="RECIPES_COMMAND")
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    ls = sub.add_parser("list", help="names and one-line summaries")
    ls.add_argument("kind", nargs="?", help="only this kind: data, pretrain, sft")
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="print a recipe (copy it to edit: kiln recipes show NAME > mine.yaml)")
    show.add_argument("name", help="e.g. pretrain/tiny, or just tiny")
    show.add_argument("--path", action="store_true", help="print the file's path instead of its text")
    show.set_defaults(func=cmd_show)
