"""``ssl-distill <command>``: the one entry point. Parsing only; each command's help doubles as advice.

The commands, their arguments and the functions that run them are listed in :mod:`ssl_distill.commands`, the
registry the Slurm job runs through too. Building this parser imports argparse-only modules (no torch), so
``ssl-distill --help`` stays instant; a command's own modules are imported when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ssl_distill.commands import COMMANDS, add_command_parser, execute, parse_with_overrides


def build_parser() -> argparse.ArgumentParser:
    """The ``ssl-distill`` parser: ``-v`` and one sub-parser per registered command."""
    parser = argparse.ArgumentParser(
        prog="ssl-distill",
        description="Self-supervised ViT pretraining (DINOv2 / iBOT recipe): train, evaluate, use the model zoo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cli_command", metavar="<command>")
    sub.required = True
    for command in COMMANDS.values():
        add_command_parser(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = parse_with_overrides(build_parser(), argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
