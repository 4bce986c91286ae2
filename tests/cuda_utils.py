"""Helpers of the CUDA tests (``pytest -m cuda``): the device they run on, and deterministic CLI training runs.

The tests marked ``cuda`` run on the first CUDA device and are skipped without one. ``SSL_DISTILL_CUDA_TESTS_ON_CPU=1``
runs them on the CPU instead (kernels that exist only on CUDA are then skipped): that is how the GPU check's dry run
(``benchmarks/gpu_check.sh --dry-run``) proves on a machine without a GPU that the tests themselves work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ON_CPU_ENV = "SSL_DISTILL_CUDA_TESTS_ON_CPU"
KILL_ENV = "SSL_DISTILL_TEST_SIGKILL_AFTER"

# The deterministic settings of a reproducible CUDA run, applied before the CLI's own code runs:
# - torch.use_deterministic_algorithms(True, warn_only=True): deterministic kernels where PyTorch has them (index_add,
#   SDPA backward, cuDNN convolutions ...); an op without one warns ("... does not have a deterministic
#   implementation") instead of stopping the run, so a failing comparison can name it.
# - CUBLAS_WORKSPACE_CONFIG=:4096:8: cuBLAS reductions in a fixed order (required by the flag above on CUDA >= 10.2).
# - cudnn.benchmark off: no timing-based choice of kernels between runs.
# With KILL_ENV=<file name>, the process SIGKILLs itself right after it renames a file of that name into place (an
# atomic write, e.g. checkpoint model_0000002.pth): a real kill at a known point, without a race against a watcher.
RUNNER = f"""
import os, signal, sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
kill = os.environ.get("{KILL_ENV}")
if kill:
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.basename(os.fspath(dst)) == kill:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
from ssl_distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cuda_test_device() -> torch.device:
    """The device of the CUDA tests: ``cuda`` (skip the test when there is none), or the CPU for the dry run."""
    if os.environ.get(ON_CPU_ENV) == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device ({ON_CPU_ENV}=1 runs the CUDA tests on the CPU)")
    return torch.device("cuda", 0)



def deterministic_env(kill_after: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    env.pop(KILL_ENV, None)
    if kill_after:
        env[KILL_ENV] = kill_after
    return env


def run_cli_deterministic(args: list[str], kill_after: str | None = None,
                          timeout: float = 240) -> subprocess.CompletedProcess:
    """``ssl-distill ARGS`` in a fresh process with the deterministic settings above (and the optional self-kill)."""
    return subprocess.run([sys.executable, "-c", RUNNER, *args], env=deterministic_env(kill_after), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def nondeterminism_warnings(*procs: subprocess.CompletedProcess) -> list[str]:
    """The ops that warned they have no deterministic implementation, from the runs' stderr."""
    lines = (line.strip() for p in procs for line in p.stderr.splitlines())
    return sorted({line for line in lines if "deterministic" in line and "Warning" in line})
