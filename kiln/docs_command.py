"""`kiln docs`: write the recipe reference pages and the pipeline picture under docs/, or check they are current.
Light at import time: the config classes (which need the 'data' extra) and matplotlib load inside the command."""

from __future__ import annotations

import argparse


def cmd_docs(args: argparse.Namespace) -> int:
    from kiln.config import ConfigError
    from kiln.config_docs import UndocumentedField

    try:
        return _docs(args)
    except UndocumentedField as e:  # a developer's to fix, in the one `kiln: error:` format all the same
        raise ConfigError(str(e)) from None


def _docs(args: argparse.Namespace) -> int:
    from kiln.docs_pages import stale_pages, write_docs

    if args.check:
        stale = stale_pages(args.out)
        if stale:
            print(f"stale or missing under {args.out}/: {', '.join(stale)}; run `kiln docs` and commit the result")
            return 1
        print(f"{args.out}/: the recipe pages match the config dataclasses")
        return 0
    for path in write_docs(args.out):
        print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "docs",
        help="generate the recipe reference pages and the pipeline picture (docs/)",
        description="Write one page per recipe kind (docs/recipes/data.md, pretrain.md, sft.md) listing every field "
        "with its type, default and meaning, read from the config dataclasses and the comments beside their "
        "fields, and docs/pipeline.png. A field without a comment is an error naming its file and line.",
        epilog="examples:\n  kiln docs                 # regenerate docs/ (run from the repository root)\n"
        "  kiln docs --check         # exit 1 when a page differs from what the code generates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="docs", help="output folder (default: docs)")
    p.add_argument("--check", action="store_true", help="compare with a fresh generation instead of writing")
    p.set_defaults(func=cmd_docs)
