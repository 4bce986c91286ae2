"""One training run per output directory: an exclusive lock held for the run's lifetime.

Two runs in one directory would overwrite each other's checkpoints and write every metric line twice. The lock is
an ``flock`` on ``<output_dir>/.ssl_distill.lock``: the kernel releases it when the holding process ends, however it
ends (SIGKILL and a Slurm preemption included), so a requeued job on any node takes it again; it works on local
and NFS file systems. The file also records who holds it (host, PID, start time, command) for the refusal message.

A lock can outlive its run only through processes that inherited its file descriptor, such as DataLoader workers
of a run that was just killed, which exit within seconds: when the recorded holder is a dead process on this host,
the lock is retried for a while before the start is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
LOCK_FILE = ".ssl_distill.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the output directory; the message names it and what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(output_dir):`` — or :meth:`acquire` / :meth:`release` — around a run.

    ``stale_wait_s``: how long to retry when the recorded holder is a dead process on this host.
    """

    def __init__(self, output_dir: str | os.PathLike, stale_wait_s: float = 20.0) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.stale_wait_s = stale_wait_s
        self._fd: int | None = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its (last) holder; empty when unreadable."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _holder_is_dead_here(self, info: dict[str, Any]) -> bool:
        return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
            and not _pid_alive(info["pid"])

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = self.holder()
                if not self._holder_is_dead_here(info):
                    os.close(fd)
                    raise RunLockedError(self._refusal(info)) from None
                deadline = deadline or time.monotonic() + self.stale_wait_s
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RunLockedError(self._refusal(info, leftover=True)) from None
                time.sleep(0.2)  # the dead run's leftover children (data-loader workers) are exiting
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                logger.warning("%s: this file system does not support locks (%s); a second run started in this "
                               "directory would not be detected", self.path.parent, exc.strerror)
                break
        self._fd = fd
        self._write_holder(fd)
        return self

    def _write_holder(self, fd: int) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)

    def _refusal(self, info: dict[str, Any], leftover: bool = False) -> str:
        who = (f"process {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
               f" ({info.get('command', '?')})") if info else "another process"
        if leftover:
            return (f"{self.path.parent} is still locked by leftover processes of a dead run ({who}), e.g. its "
                    f"data-loader workers; find them with `fuser -v {self.path}` and stop them, then start again.")
        return (f"{self.path.parent} is in use by another training run: {who}. Two runs in one directory would "
                "overwrite each other's checkpoints; wait for it to finish or stop it (it checkpoints on SIGTERM), "
                "or choose another --output-dir.")

    def release(self) -> None:
        """Give the lock up (the file stays: removing it could race with a run that is taking it)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
