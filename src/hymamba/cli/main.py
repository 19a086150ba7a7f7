"""The ``hymamba`` command: parse, call one library function, print.

Error policy: hymamba's own errors (:mod:`hymamba.errors`) print as one line — ``hymamba: error:
...`` — and exit with status 2 when the input was at fault (a config value, data, a checkpoint) or 1
when the work failed (training diverged, a kernel is unavailable). Anything else is a bug and keeps
its traceback. Ctrl-C exits 130.

Each subcommand is a module in :mod:`hymamba.cli.commands` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; only the chosen subcommand's arguments are built (they may import torch),
so ``hymamba --help`` loads nothing heavy.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional, Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: subcommand -> its module under hymamba.cli.commands, in the order --help lists them
COMMANDS = ("models", "forward", "train", "ablate", "validate", "predict", "embed", "export", "convert", "benchmark",
            "segment", "detect")


def _command_module(name: str):
    return importlib.import_module(f"hymamba.cli.commands.{name}")


def _chosen(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named on the command line (the first word that is one), or None."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the subcommand it names gets its arguments (None: all do)."""
    parser = argparse.ArgumentParser(prog="hymamba", description="MambaVision on any device.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for name in COMMANDS:
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, **getattr(module, "PARSER_KWARGS", {}))
        if argv is None or name == chosen:
            module.add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hymamba`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a malformed command line (2): a status, not an exception
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    from hymamba.errors import USAGE_ERRORS, HymambaError

    try:
        return _command_module(args.command).run(args)
    except USAGE_ERRORS as e:
        print(f"hymamba: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except HymambaError as e:
        print(f"hymamba: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hymamba: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The message, with a multi-line report indented under its first line."""
    text = str(e) or type(e).__name__
    lines: List[str] = text.splitlines()
    return "\n".join([lines[0]] + [f"  {line.strip()}" for line in lines[1:]]) if len(lines) > 1 else text


if __name__ == "__main__":
    sys.exit(main())
