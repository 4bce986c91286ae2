"""Helpers for tests that run real training processes (`ssl-distill train`, torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def tiny_overrides(dataset: str, **extra: object) -> list[str]:
    """A few-iteration tiny run on ``dataset`` with one metric line per iteration."""
    base = {
        "train.dataset_path": dataset, "train.batch_size_per_gpu": 8, "train.iters_per_epoch": 4,
        "optim.epochs": 2, "optim.warmup_epochs": 1, "train.log_period": 1, "train.checkpoint_period": 2,
        "train.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_train(out_dir: Path | str, overrides: list[str], nproc: int = 1, timeout: float = 300,
              extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`ssl-distill train` in a subprocess (or under torchrun with ``nproc`` CPU ranks)."""
    cmd = _train_command(out_dir, nproc, extra_args)
    return subprocess.run(cmd + overrides, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _train_command(out_dir: Path | str, nproc: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    cli = ["-m", "ssl_distill.cli", "train", "--config-file", TINY, "--output-dir", str(out_dir), *extra_args]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    return [sys.executable, *cli]


def popen_train(out_dir: Path | str, overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    """`ssl-distill train` started in the background, in a process group of its own (kill it with os.killpg)."""
    return subprocess.Popen(_train_command(out_dir, nproc) + overrides, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
