"""Verified, resumable, atomic downloads into the model cache.

* cache: ``$SSL_DISTILL_HOME/checkpoints`` (default ``~/.cache/ssl_distill/checkpoints``); a file in the cache is
  used without touching the network.
* resume: bytes arrive in ``<file>.partial``; an interrupted transfer is retried with an HTTP ``Range`` request
  (also by the next run), a server that ignores ``Range`` restarts the file.
* atomic: the finished ``.partial`` is fsynced, verified and renamed into place, so the cache only ever holds
  complete files; a ``<file>.lock`` (POSIX ``flock``) makes processes sharing a cache download a file once.
* verification, before a file enters the cache: its size against the server's ``Content-Length``, the registry's
  exact ``size`` or ``min_size`` (the fp32 tensor data of the entry's parameters), the CRC of every member of a
  PyTorch zip archive, and the sha256 when known. A file that fails is deleted, never cached. The size and sha256
  of a verified file are recorded beside it (``<file>.verified``); a cached file whose size no longer matches that
  record or the registry (or whose zip directory is damaged) is downloaded again.
* offline: ``SSL_DISTILL_OFFLINE=1`` (or a network failure) uses the cache or fails saying what to download where.
* mirrors: ``SSL_DISTILL_BASE_URL`` replaces the zoo's base URL (see :meth:`ModelEntry.url`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ssl_distill.fileio import _fsync_dir, format_bytes, free_bytes
from ssl_distill.hub.registry import HubError, ModelEntry, get_model

logger = logging.getLogger(__name__)

HOME_ENV = "SSL_DISTILL_HOME"
OFFLINE_ENV = "SSL_DISTILL_OFFLINE"
_CHUNK = 1 << 20


class _Interrupted(Exception):
    """The transfer stopped before the end; the bytes received so far are kept in the partial file."""


def cache_dir() -> Path:
    """Root of the ssl_distill cache: ``$SSL_DISTILL_HOME`` or ``~/.cache/ssl_distill``."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "ssl_distill"


def weights_dir() -> Path:
    """Where downloaded weights live: ``cache_dir() / "checkpoints"``."""
    return cache_dir() / "checkpoints"


def is_offline() -> bool:
    """True when ``$SSL_DISTILL_OFFLINE`` is set to 1/true/yes/on."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar on an interactive terminal (or when forced), else a no-op context."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:
        return nullcontext(None)
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def _read(resp: Any) -> bytes:
    """Next chunk of the response; a broken connection is an interruption (disk errors are not)."""
    try:
        return resp.read(_CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(f"{type(exc).__name__}: {exc}") from None


def _fetch(url: str, partial: Path, timeout: float, progress: bool | None) -> None:
    """One HTTP request appending to (or restarting) ``partial``; raises :class:`_Interrupted` on a short read."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "ssl-distill"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial is not a prefix the server can continue: start again
            partial.unlink()
            raise _Interrupted("server refused to resume; restarting") from None
        raise
    with resp:
        if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            partial.unlink(missing_ok=True)  # a range we did not ask for: start again from byte 0
            raise _Interrupted("server sent an unexpected byte range; restarting")
        if resp.status != 206:  # 200: the server ignores Range and sends the whole file
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as f, _progress_bar(total, have, partial.name[:-8], progress) as bar:
            while chunk := _read(resp):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = partial.stat().st_size
    if total is not None and size < total:
        raise _Interrupted(f"connection closed after {size} of {total} bytes")


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold ``<dest>.lock`` so that processes sharing a cache (e.g. torchrun ranks) download a file once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cache_full(url: str, partial: Path, size: int | None) -> HubError:
    """The download of ``url`` stopped because the cache's file system is full (its partial file is kept)."""
    have = partial.stat().st_size if partial.exists() else 0
    need = f"it needs {format_bytes(size - have)} more, " if size else ""
    return HubError(
        f"disk full while downloading {url} into {partial.parent}: {need}{format_bytes(free_bytes(partial.parent))} "
        f"free. Free space there or set {HOME_ENV} to a cache on a larger disk; the {format_bytes(have)} already "
        f"downloaded ({partial.name}) are kept and the download resumes from them."
    )


def _unreachable(url: str, dest: Path, why: str) -> HubError:
    partial = _partial_path(dest)
    kept = f" ({partial.stat().st_size} bytes kept in {partial} for resuming)" if partial.exists() else ""
    return HubError(
        f"{dest.name} is not in the cache and cannot be downloaded ({why}){kept}. Download {url} on a machine with "
        f"network access and copy it to {dest}, or set {HOME_ENV} to a cache that holds it, or point "
        "SSL_DISTILL_BASE_URL at a mirror."
    )


def download_url(url: str, dest: str | os.PathLike, sha256: str | None = None, *, progress: bool | None = None,
                 retries: int = 3, timeout: float = 30.0, min_size: int = 0, size: int | None = None) -> Path:
    """Download ``url`` to ``dest`` (a cached copy that passes verification is kept), resuming and verifying.

    Args:
        sha256: expected hex digest; on a mismatch the partial file is deleted and :class:`HubError` raised.
        progress: show a tqdm bar (None: only on an interactive terminal).
        retries: resumptions attempted after an interrupted transfer within this call.
        timeout: socket timeout in seconds.
        min_size / size: bytes a complete file has at least / exactly (see the module docstring).
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        problems = _cheap_problems(dest, sha256, min_size, size, _read_record(dest))
        if not problems:
            return dest
        if is_offline():
            raise HubError(f"the cached {dest} fails verification ({'; '.join(problems)}) and {OFFLINE_ENV}=1 "
                           f"forbids downloading it again: delete it and download {url} again, or copy a good copy "
                           "there.")
        logger.warning("the cached %s fails verification (%s); downloading it again", dest, "; ".join(problems))
    if is_offline():
        raise _unreachable(url, dest, f"offline mode: {OFFLINE_ENV}=1")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):
        if dest.is_file() and _cheap_problems(dest, sha256, min_size, size, _read_record(dest)):
            dest.unlink()  # a bad cached copy (another process may have replaced it with a good one meanwhile)
            _record_path(dest).unlink(missing_ok=True)
        if not dest.is_file():
            _download_locked(url, dest, sha256, progress, retries, timeout, (min_size, size))
    return dest


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _read_record(dest: Path) -> dict[str, Any]:
    """What was recorded when ``dest`` was downloaded and verified (empty for files copied in by hand)."""
    try:
        record = json.loads(_record_path(dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _zip_problem(path: Path, check_crc: bool) -> str | None:
    """Whether a PyTorch zip archive is complete (its central directory; with ``check_crc`` every member's CRC).
    Files that are not zip archives (safetensors, legacy pickles) are not checked here."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if check_crc else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"it is not a complete zip archive ({exc})"
    return f"its member {bad} fails its CRC check" if bad else None


def _cheap_problems(path: Path, sha256: str | None, min_size: int, size: int | None,
                    record: dict[str, Any]) -> list[str]:
    """Reasons ``path`` is not a complete copy, from its size and zip directory (no full read)."""
    n, problems = path.stat().st_size, []
    if size is not None and n != size:
        problems.append(f"it is {n} bytes, the registry records {size}")
    elif n < min_size:
        problems.append(f"it is {n} bytes, shorter than the {min_size} bytes of a complete file")
    if record.get("size") not in (None, n):
        problems.append(f"it is {n} bytes, but had {record['size']} when it was downloaded and verified")
    if sha256 and record.get("sha256") not in (None, sha256.lower()):
        problems.append(f"its recorded sha256 {record['sha256']} is not the expected {sha256}")
    if (zip_problem := _zip_problem(path, check_crc=False)) is not None:
        problems.append(zip_problem)
    return problems


def _download_locked(url: str, dest: Path, sha256: str | None, progress: bool | None, retries: int,
                     timeout: float, sizes: tuple[int, int | None]) -> None:
    partial = _partial_path(dest)
    for attempt in range(retries + 1):
        try:
            _fetch(url, partial, timeout, progress)
            break
        except _Interrupted as exc:
            if attempt == retries:
                raise _unreachable(url, dest, f"interrupted {attempt + 1} times, last: {exc}") from None
            logger.warning("download of %s interrupted (%s); resuming", url, exc)
        except urllib.error.HTTPError as exc:
            raise HubError(f"download of {url} failed: HTTP {exc.code} {exc.reason}. Check the URL "
                           "(and SSL_DISTILL_BASE_URL if you use a mirror).") from None
        except OSError as exc:
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                raise _cache_full(url, partial, sizes[1]) from None
            raise _unreachable(url, dest, f"network error: {getattr(exc, 'reason', exc)}") from None
        except http.client.HTTPException as exc:
            raise _unreachable(url, dest, f"network error: {exc}") from None
    problems = _cheap_problems(partial, None, *sizes, {})
    if not problems and (zip_problem := _zip_problem(partial, check_crc=True)) is not None:
        problems.append(zip_problem)
    digest = sha256_file(partial) if not problems else None
    if sha256 and digest is not None and digest != sha256.lower():
        problems.append(f"its sha256 is {digest}, expected {sha256}")
    if problems:
        partial.unlink()
        raise HubError(f"the download of {url} fails verification ({'; '.join(problems)}). It was deleted, nothing "
                       "was cached; try again, and check the mirror if SSL_DISTILL_BASE_URL is set.")
    record = {"size": partial.stat().st_size, "sha256": digest, "url": url}
    _record_path(dest).write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(partial, dest)
    _fsync_dir(dest.parent)
    logger.info("downloaded %s to %s (%d bytes, sha256 %s)", url, dest, record["size"], digest)


def download(name: str | ModelEntry, dest_dir: str | os.PathLike | None = None, *, progress: bool | None = None,
             base_url: str | None = None) -> Path:
    """Download a zoo model's weights into ``dest_dir`` (default :func:`weights_dir`) and return the file path."""
    entry = get_model(name)
    url = entry.url(base_url)
    dest = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    return download_url(url, dest / str(entry.filename), entry.sha256, progress=progress, min_size=entry.min_size,
                        size=entry.size)


def resolve_weights(weights: str | os.PathLike, *, progress: bool | None = None) -> Path:
    """A local path for ``weights``: an ``http(s)://`` URL is downloaded into the cache, ``file://`` and plain
    paths must exist."""
    text = str(weights)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("http", "https"):
        name = Path(urllib.parse.unquote(parsed.path)).name or "weights.pth"
        key = hashlib.sha256(text.encode()).hexdigest()[:12]  # same basename at different URLs: different files
        return download_url(text, weights_dir() / "urls" / f"{key}-{name}", progress=progress)
    path = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(text).expanduser()
    if not path.is_file():
        raise HubError(f"weights file '{path}' does not exist; pass a file path, an http(s) URL or a model name")
    return path
