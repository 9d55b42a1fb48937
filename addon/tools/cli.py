"""`python -m addon ...`: the command line.

Each subcommand lives in its own module, which provides
`register(subparsers) -> None` and sets `func(args) -> int` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in help order.
COMMAND_MODULES = [
    "addon.tools.run",  # run
    "addon.tools.status",  # status, reset
    "addon.tools.reprice",  # reprice
    "addon.tools.top",  # top
    "addon.tools.reconcile",  # reconcile
    "addon.tools.keys",  # keys
    "addon.tools.collect",  # collect
]


def add_common(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    """--db and --config, the same for every subcommand."""
    parser.add_argument("--db", default="usage.db", help="SQLite database (default: usage.db)")
    if config:
        parser.add_argument("--config", default=None, help="TOML config file (default: the bundled one)")


def build_parser() -> argparse.ArgumentParser:
    # The same commands as `python -m addon` and as the console script.
    prog = "openai-usage-meter" if sys.argv and sys.argv[0].endswith("openai-usage-meter") else "python -m addon"
    parser = argparse.ArgumentParser(prog=prog, description="Meter OpenAI API traffic through mitmproxy.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # clear message, no traceback, for expected failures
        from addon.config import ConfigError

        if isinstance(exc, (ConfigError, FileNotFoundError, PermissionError, ConnectionError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
