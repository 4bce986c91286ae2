#!/usr/bin/env python3
"""Thin wrapper: `python tools/eval_knn.py ARGS` == `ssl-distill eval-knn ARGS` (see `--help`)."""

from __future__ import annotations

import sys

from ssl_distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-knn", *sys.argv[1:]]))
