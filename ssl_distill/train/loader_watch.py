"""A DataLoader worker that dies (the OOM killer, a signal to the whole process group) stops the run cleanly.

:class:`ChildWatch` makes the failure surface at ``next(data_iter)``, before a step, and remembers which worker
died of which signal; the trainer then saves the state of the last completed iteration and raises
:class:`LoaderFailed` (or, when a stop signal arrived too, its ordinary stop).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Any


class LoaderFailed(Exception):
    """A DataLoader worker died (the OOM killer, a signal to the process group): the state of the last completed
    iteration was saved. ``detail``: which worker and how it ended, ``iteration``/``checkpoint``: what was saved."""

    def __init__(self, iteration: int, checkpoint: Path | None, detail: str) -> None:
        super().__init__(f"{detail} at iteration {iteration}; saved {checkpoint}")
        self.iteration, self.checkpoint, self.detail = iteration, checkpoint, detail


class ChildWatch:
    """Replaces PyTorch's SIGCHLD handler (installed with the first worker) for the training loop; records how
    children ended. :meth:`restore` puts the previous handler back.

    PyTorch's handler raises "DataLoader worker ... killed by signal" from wherever the main thread is when a worker
    dies — in the middle of an optimizer step or a checkpoint write. Without it the same failure is raised by
    ``next(data_iter)`` (the loader checks its workers while it waits), before a step begins, so the state of the
    last completed iteration is intact and can be saved. The handler reads each death with ``waitid(WNOWAIT)``,
    which leaves the child for the loader to reap, before the loader reaps it (and the signal is no longer known).
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.deaths: dict[int, tuple[int, int]] = {}  # pid -> (si_code, si_status)
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGCHLD)
            signal.signal(signal.SIGCHLD, self._on_child)

    def _on_child(self, signum: int, frame: Any) -> None:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is not None and info.si_pid not in self.deaths:
            self.deaths[info.si_pid] = (info.si_code, info.si_status)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGCHLD, self.previous)
            self.previous = None

    def explains(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by ``next(data_iter)``) is the loader reporting a dead worker — not an error
        inside a worker's dataset code, which the loader re-raises too and which must keep its traceback."""
        killed = any(code in (os.CLD_KILLED, os.CLD_DUMPED) for code, _ in self.deaths.values())
        return killed or "exited unexpectedly" in str(exc) or "killed by signal" in str(exc)

    def describe(self, message: str) -> str:
        """"DataLoader worker 1234 was killed by SIGKILL" for the loader's error ``message``; the loader's first
        line when no worker death was seen."""
        named = [int(p) for p in re.findall(r"\d+", message.split("pid", 1)[1])] if "pid" in message else []
        pid = next((p for p in named if p in self.deaths), next(iter(self.deaths), None))
        if pid is None:
            return message.strip().splitlines()[0] if message.strip() else "a DataLoader worker failed"
        code, status = self.deaths[pid]
        if code not in (os.CLD_KILLED, os.CLD_DUMPED):
            return f"DataLoader worker {pid} exited with status {status}"
        hint = " (e.g. by the out-of-memory killer, see `dmesg`: lower train.num_workers or the batch size)" \
            if status == signal.SIGKILL else ""
        return f"DataLoader worker {pid} was killed by {signal.Signals(status).name}{hint}"
