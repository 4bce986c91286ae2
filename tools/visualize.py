#!/usr/bin/env python3
"""Same as `ssl-distill visualize ...` (cf. DINO's visualize_attention.py): CLS-attention maps to PNG."""

import sys

from ssl_distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
