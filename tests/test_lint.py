"""The code base stays ruff clean (docs/ARCHITECTURE.md, "Conventions")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff is not None, "ruff is a dev dependency but is not installed: pip install -e '.[dev]' (or make install)"
    paths = [p for p in ("ssl_distill", "tests", "tools", "benchmarks", "hubconf.py") if (REPO / p).exists()]
    result = subprocess.run([ruff, "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
