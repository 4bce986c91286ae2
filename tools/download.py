#!/usr/bin/env python3
"""Thin wrapper: `python tools/download.py NAME [--dest DIR]` == `ssl-distill download NAME [--dest DIR]`."""

from __future__ import annotations

import sys

from ssl_distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
