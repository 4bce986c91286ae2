"""``ssl-distill <command>``: the one entry point. Each command's help doubles as advice.

Commands import their heavy modules lazily so ``ssl-distill --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ssl_distill.config import ConfigError

logger = logging.getLogger("ssl_distill")


class UserError(Exception):
    """A mistake the user can fix; printed as one line without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", default=None, help="experiment YAML overriding the typed defaults (configs/*.yaml)")
    p.add_argument(
        "opts", nargs="*", default=[], metavar="key=value",
        help="dotlist overrides applied last, e.g. optim.epochs=10 train.batch_size_per_gpu=32",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from ssl_distill.demo import run_demo

    return run_demo(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-distill",
        description="Self-supervised ViT pretraining (DINOv2 / iBOT recipe): train, evaluate, use the model zoo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    demo = sub.add_parser("demo", help="run the built-in demo on bundled data and print the result")
    _add_config_args(demo)
    demo.add_argument("--output-dir", default="demo_output", help="where the demo writes its outputs")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"ssl-distill {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
