#!/usr/bin/env python3
"""Same as `ssl-distill submit ...`: run train / eval-knn / eval-linear on Slurm (see `--help`)."""

import sys

from ssl_distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
