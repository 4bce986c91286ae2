"""Shared helpers of the benchmark scripts: alternating timing, peak memory, matmul peak, tables and JSON.

Every benchmark compares a candidate with a baseline measured in the same process: runs alternate
(baseline, candidate, baseline, ...) so that drift (thermal, other load) hits both, and the median of the repeats
is reported. Nothing here is imported by the package or the test suite.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak memory of a code region, as extra bytes over the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry). CPU: a thread samples the process RSS every
    ``interval`` seconds (it sleeps in between, so it costs no measurable time); ``peak`` is max RSS - RSS at entry,
    and ``peak_total`` the max RSS itself.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_total = max(self.peak_total, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = _rss_bytes()
            self.peak_total = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_total = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_total = max(self.peak_total, _rss_bytes())
        self.peak = self.peak_total - self._start


def time_alternating(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1,
    deadline: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``, run in turn (a, b, a, b, ...) ``repeats`` times after
    ``warmup`` untimed rounds. Returns the list of times per name.

    ``deadline`` (a ``time.perf_counter()`` value): after the first timed round, stop early when another round
    would end past it, so a time-boxed run still reports the rounds it finished."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        round_start = time.perf_counter()
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
        now = time.perf_counter()
        if deadline is not None and r >= warmup and now + (now - round_start) > deadline:
            break
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                      repeats: int = 5) -> float:
    """Measured dense matmul throughput (FLOP/s) of ``device`` for ``dtype``: best of ``repeats`` ``n x n`` GEMMs."""
    n = n or (2048 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        env["lightly"] = version("lightly")
    except Exception:  # noqa: BLE001 - lightly is optional
        pass
    return env


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Print ``rows`` as a GitHub-markdown table (floats with 3 significant digits); returns the text."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` (plus the environment and a UTC timestamp) to ``<out_dir>/<name>.json`` atomically."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "environment": environment(), **payload}
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    return path
