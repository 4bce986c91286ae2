"""One training run per output directory: an exclusive lock held for the run's lifetime.

Two runs in one directory would overwrite each other's checkpoints and write every metric line twice. The lock is
an ``flock`` on the output directory itself (opened read-only), so a stray ``rm`` cannot take it away: a lock on a
file dies with the file's name (delete it and the next run locks a new file beside the held one). The kernel releases
it when the holding process ends, however it ends (SIGKILL and a Slurm preemption included), so a requeued job on
any node takes it again. Where a directory cannot be locked (some NFS setups), the file
``<output_dir>/.ssl_distill.lock`` is locked instead, as before. That file also records who holds the lock (host,
PID, start time, command) for the refusal message; it is written again if it was deleted.

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
import stat
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
        self.locked = self.path.parent  # what the flock is on: the directory (or the lock file where it cannot be)

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

    def _open_lockable(self) -> int:
        """A descriptor of the directory when this file system can ``flock`` it exclusively, else of the lock file
        (NFS emulates flock with POSIX locks, which need a file open for writing)."""
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe: taken again (or reported) by acquire()
            fcntl.flock(fd, fcntl.LOCK_UN)
            return fd
        except BlockingIOError:
            return fd  # someone holds it: directory locks work here, acquire() reports the holder
        except OSError:
            os.close(fd)
        self.locked = self.path
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open_lockable()
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
        try:
            self._write_holder(fd)
        except BaseException:
            self.release()
            raise
        return self

    def _write_holder(self, fd: int) -> None:
        """Record who holds the lock in the lock file (written again if it was deleted)."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        target = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666) if stat.S_ISDIR(os.fstat(fd).st_mode) else fd
        try:
            os.ftruncate(target, 0)
            os.pwrite(target, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(target)
        finally:
            if target != fd:
                os.close(target)

    def _refusal(self, info: dict[str, Any], leftover: bool = False) -> str:
        who = (f"process {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
               f" ({info.get('command', '?')})") if info else \
            f"a process whose record {self.path.name} was deleted (`fuser -v {self.locked}` shows it)"
        if leftover:
            return (f"{self.path.parent} is still locked by leftover processes of a dead run ({who}), e.g. its "
                    f"data-loader workers; find them with `fuser -v {self.locked}` and stop them, then start again.")
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
