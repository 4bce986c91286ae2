"""Atomic file writes: temp file in the same directory, fsync, rename.

Every file that matters (configs, checkpoints, exported weights, downloads, metrics summaries) goes through
``atomic_open`` so an interrupted run never leaves a half-written file where a good one was. A full disk is one
:class:`DiskFullError` naming the file, the size it needs and the space free — before the write when the size is
known in advance (``expected_size``), else when the write fails; the file that was there stays as it was. Temp files
that a killed process left behind (SIGKILL skips every clean-up) are removed by :func:`remove_stale_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_open's mkstemp names look like
_LOW_SPACE = 1 << 20  # a write that fails with less than this free failed for want of space


class DiskFullError(OSError):
    """No room for a file: ``str()`` is one line naming the file, the bytes needed and the bytes free."""

    def __init__(self, path: str | os.PathLike, needed: int | None, free: int, advice: str = "",
                 at_least: bool = False) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.needed, self.free = needed, free
        need = f"needs {'more than' if at_least else 'about'} {format_bytes(needed)}, " if needed else ""
        self.line = (f"disk full: '{path}' {need}{format_bytes(free)} free on that file system; "
                     f"{advice or 'free space or choose another location'} (the file that was there, if any, is "
                     "unchanged).")

    def __str__(self) -> str:
        return self.line


def format_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged write may still use on ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_free_space(path: str | os.PathLike, needed: int, advice: str = "") -> None:
    """Raise :class:`DiskFullError` now when ``path``'s file system has less than ``needed`` bytes free."""
    free = free_bytes(Path(path).parent)
    if free < needed:
        raise DiskFullError(path, needed, free, advice)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) container: about what ``torch.save`` of it writes."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    nelement = getattr(obj, "nelement", None)
    return nelement() * obj.element_size() if callable(nelement) and hasattr(obj, "element_size") else 0


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write failed for want of space: ENOSPC/EDQUOT anywhere in the chain, or a writer that hides
    it (``torch.save``'s "unexpected pos" RuntimeError) while almost nothing is free."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, (RuntimeError, OSError)):
        return False
    try:
        return free_bytes(directory) < _LOW_SPACE
    except OSError:
        return False


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                expected_size: int | None = None, advice: str = "") -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    On an exception the temp file is removed and ``path`` is left as it was. The file gets the mode ``open()``
    would give a new file (``0o666`` minus the umask), so colleagues can read checkpoints on a shared cluster.
    ``expected_size``: the bytes the file will take, checked against the free space before anything is written. A
    write that fails for want of space raises :class:`DiskFullError` (``advice``: what to do, in its message).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if expected_size:
        check_free_space(path, expected_size, advice)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a file should get what open() would give
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _is_disk_full(exc, path.parent)
        written = os.stat(tmp).st_size if full and os.path.exists(tmp) else 0
        Path(tmp).unlink(missing_ok=True)
        if full and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, expected_size or written or None, free_bytes(path.parent), advice,
                                at_least=not expected_size) from None
        raise


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files that :func:`atomic_open` left in ``directory`` when its process was killed mid-write
    (call it only while no other process writes there, e.g. under the run lock); logs what was freed."""
    d = Path(directory)
    stale = [p for p in d.iterdir() if _TEMP_RE.match(p.name) and p.is_file()] if d.is_dir() else []
    size = 0
    for p in stale:
        with contextlib.suppress(OSError):
            size += p.stat().st_size
            p.unlink()
    if stale:
        logger.warning("removed %d temp file(s) of interrupted writes from %s (%s freed): %s", len(stale), d,
                       format_bytes(size), ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else ""))
    return stale


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only around a file creation)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)
