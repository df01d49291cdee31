"""The `kiln` command. Each stage registers its own subcommands (`register(subparsers)` in its `cli.py`), so
this file stays a dispatcher and heavy imports (torch, datatrove) happen only inside the command that needs
them: `kiln --help` imports neither (tests/test_packaging.py checks it)."""

from __future__ import annotations

import argparse
import sys

from kiln import __version__
from kiln.commands import register_modules
from kiln.config import ConfigError

# Modules that contribute subcommands. A module listed here must import quickly (no torch at import time).
COMMAND_MODULES = (
    "kiln.demo",
    "kiln.recipes_command",
    "kiln.data_pipeline.cli",
    "kiln.pretrain.cli",
    "kiln.agent.cli",
    "kiln.docs_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: curate raw web text, pretrain with 3D parallelism, instruction-tune for agents.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kiln demo` for the end-to-end job on the embedded default corpus; `kiln recipes list` for the "
        "shipped recipes; `kiln COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show everything on the console (debug lines, datatrove's own log lines and progress bars)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_modules(sub, COMMAND_MODULES)
    return parser


def _hoist_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """`-v` is accepted anywhere on the line (`kiln data run r.yaml -v`), not only before the subcommand."""
    verbose = any(a in ("-v", "--verbose") for a in argv)
    return [a for a in argv if a not in ("-v", "--verbose")], verbose


def main(argv: list[str] | None = None) -> int:
    argv, verbose = _hoist_verbose(list(sys.argv[1:] if argv is None else argv))
    from kiln.logs import setup_logging

    setup_logging(verbose)
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
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        from kiln.extras import missing_extra_message

        message = missing_extra_message(_command_name(args), e)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted; re-run the same command to resume where it stopped.", file=sys.stderr)
        return 130


def _command_name(args: argparse.Namespace) -> str:
    """`data tokenize` from the parsed namespace (subparsers store their choice in `<name>_command`)."""
    sub = [str(getattr(args, k)) for k in vars(args) if k.endswith("_command") and getattr(args, k)]
    return " ".join([args.command, *sub])


if __name__ == "__main__":
    sys.exit(main())
