"""Run a function in N spawned ``torch.distributed`` processes (gloo, CPU) and collect per-rank results.

Usage from a test::

    from dist_utils import run_distributed

    def _check(rank: int, world_size: int, data: dict) -> dict:   # module level, so it can be pickled
        ...                                                      # torch.distributed is initialised here
        return {"center": loss.center}

    def test_something(tmp_path):
        results = run_distributed(_check, world_size=2, args=(data,), tmp_path=tmp_path)
        assert torch.allclose(results[0]["center"], results[1]["center"])

``fn`` runs as ``fn(rank, world_size, *args)`` in a fresh process with one torch thread, after
``torch.distributed.init_process_group`` on a free localhost port; its return value comes back through a
``torch.save`` file. A failing rank raises in the parent with the child's traceback; a run that outlives
``timeout_s`` is terminated and raises ``TimeoutError``.
"""

from __future__ import annotations

import datetime
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on localhost, for a test's process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    args: Sequence[Any],
    result_dir: str,
    backend: str,
    timeout_s: float,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        tmp = Path(result_dir) / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        tmp.rename(Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    tmp_path: Path | str | None = None,
    timeout_s: float = 120.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results in rank order.

    Args:
        fn: a module-level (picklable) function; ``torch.distributed`` is initialised when it runs.
        world_size: number of processes.
        args: extra picklable arguments passed to every rank.
        tmp_path: directory for the result files (e.g. pytest's ``tmp_path``); a temporary one if None.
        timeout_s: wall-clock limit for the whole run (and for each collective).
        backend: ``torch.distributed`` backend; gloo runs on CPU.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (message holds the child's traceback).
        torch.multiprocessing.ProcessExitedException: a rank died without a Python exception.
        TimeoutError: the run did not finish within ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(dir=tmp_path) as result_dir:
        port = free_port()
        ctx = mp.spawn(
            _worker,
            args=(fn, world_size, port, tuple(args), result_dir, backend, timeout_s),
            nprocs=world_size,
            join=False,
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.terminate()
                for proc in ctx.processes:
                    proc.join(5)
                raise TimeoutError(f"run_distributed({fn.__name__}) did not finish within {timeout_s:.0f} s")
        # Files written moments ago by our own children: full unpickling is safe here.
        return [torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
