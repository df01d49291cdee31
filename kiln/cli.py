"""The `kiln` command. Each stage registers its own subcommands (`register(subparsers)` in its `cli.py`), so
this file stays a dispatcher and heavy imports (torch, datatrove) happen only inside the command that needs
them."""

from __future__ import annotations

import argparse
import importlib
import sys

from kiln import __version__
from kiln.config import ConfigError

# Modules that contribute subcommands. A module listed here must import quickly (no torch at import time).
COMMAND_MODULES = ("kiln.demo", "kiln.data_pipeline.cli", "kiln.pretrain.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: curate raw web text, pretrain with 3D parallelism, instruction-tune for agents.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kiln demo` for the end-to-end job on the embedded default corpus; `kiln COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency, not an absent optional stage
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: `key=value` overrides may also come after options (`run r.yaml --tasks 4 a.b=1`), which
    # argparse alone does not accept for a positional list
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"kiln: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted; re-run the same command to resume where it stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
