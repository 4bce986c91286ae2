#!/usr/bin/env python3
"""Same as `ssl-distill train ...` (kept for DINOv2 users used to tools/train.py)."""

import sys

from ssl_distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
