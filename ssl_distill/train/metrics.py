"""Training metrics: JSON lines (``training_metrics.jsonl``), TensorBoard when installed, a progress line on a TTY."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ssl_distill.fileio import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "training_metrics.jsonl"


class MetricsWriter:
    """Rank 0's metric sink. Records are numbered by completed iterations; on resume after ``start_iteration``
    completed iterations, later lines (from the interrupted run) are dropped first, so the file always describes
    one consistent run."""

    def __init__(self, output_dir: str | os.PathLike, start_iteration: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        self._tty = sys.stderr.isatty()
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _iteration(line) <= start_iteration]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=start_iteration + 1)
        except Exception:  # tensorboard not installed: JSON lines only
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._tb.add_scalar(k, v, record["iteration"])
        line = (f"[it {record['iteration']}/{record['total_iterations']}] loss {record['total_loss']:.4f} "
                f"lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s")
        if self._tty:
            sys.stderr.write(f"\r{line}   ")
            sys.stderr.flush()
        else:  # logs, Slurm output files, CI: one line per logging period
            logger.info(line)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._tty and self.enabled:
            sys.stderr.write("\n")


def _iteration(line: str) -> int:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # unreadable (half-written) line: drop it


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
