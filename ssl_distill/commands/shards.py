"""``ssl-distill shards SRC OUT``: pack an image folder into indexed tar shards (:mod:`ssl_distill.data.pack`)."""

from __future__ import annotations

import argparse

from ssl_distill.commands import UserError
from ssl_distill.data.datasets import DatasetError
from ssl_distill.data.pack import pack_shards, parse_size


def run_shards(args: argparse.Namespace) -> int:
    """Pack ``args.src`` into ``args.out`` and print the summary; user mistakes become one line."""
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: give 0 (read in this process) or more worker processes.")
    try:
        size = parse_size(args.shard_size)
        summary = pack_shards(args.src, args.out, size, args.workers, args.bad_image_policy,
                              progress=False if args.quiet else None)
    except (DatasetError, FileNotFoundError, ValueError) as exc:  # BrokenImageError is a ValueError
        raise UserError(str(exc)) from None
    for line in summary.lines():
        print(line)
    return 0
