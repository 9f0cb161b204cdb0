"""`python -m core COMMAND`: the operators' command line. Each command group lives in core/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from core.startup import explain, log_level

# Each module exposes `register(subparsers)` for the commands listed with it. The map is explicit so a
# command is one grep away, and only the module of the command being run is imported (pandas, uvicorn and
# the simulator cost seconds of start-up that `migrate` or `sessions show` should not pay).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "core.commands.engine": ("migrate", "process-pending", "replay", "sessions"),
    "core.commands.serve": ("serve",),
    "core.commands.analytics": ("funnel", "export-stalled", "hash-password"),
    "core.commands.campaigns": ("campaigns", "sending"),
    "core.commands.simulate": ("simulate",),
    "core.commands.operator": ("sessions", "outbound", "quarantine"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One clear line and exit 2, instead of argparse's usage dump.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that command's module is imported (all of them for help or typos)."""
    parser = _Parser(prog="python -m core", description="waflow session engine")
    parser.add_argument("--log-level", default="INFO", type=log_level)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    owners = [module for module, commands in COMMAND_MODULES.items() if command in commands]
    for name in owners or COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_word(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A bad setting, database URL or flow, an unreachable database: one line, no traceback. A bug keeps its.
        line = explain(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
