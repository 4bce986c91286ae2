"""Verified, resumable, atomic downloads into the model cache.

* cache: ``$SSL_DISTILL_HOME/checkpoints`` (default ``~/.cache/ssl_distill/checkpoints``); a file in the cache is
  used without touching the network.
* resume: bytes arrive in ``<file>.partial``; an interrupted transfer is retried with an HTTP ``Range`` request
  (also by the next run), a server that ignores ``Range`` restarts the file.
* atomic: the finished ``.partial`` is fsynced, verified and renamed into place, so the cache only ever holds
  complete files; a ``<file>.lock`` (POSIX ``flock``) makes processes sharing a cache download a file once.
* sha256: verified when known; a mismatch deletes the partial file and raises.
* offline: ``SSL_DISTILL_OFFLINE=1`` (or a network failure) uses the cache or fails saying what to download where.
* mirrors: ``SSL_DISTILL_BASE_URL`` replaces the zoo's base URL (see :meth:`ModelEntry.url`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ssl_distill.fileio import _fsync_dir
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


def _unreachable(url: str, dest: Path, why: str) -> HubError:
    partial = _partial_path(dest)
    kept = f" ({partial.stat().st_size} bytes kept in {partial} for resuming)" if partial.exists() else ""
    return HubError(
        f"{dest.name} is not in the cache and cannot be downloaded ({why}){kept}. Download {url} on a machine with "
        f"network access and copy it to {dest}, or set {HOME_ENV} to a cache that holds it, or point "
        "SSL_DISTILL_BASE_URL at a mirror."
    )


def download_url(url: str, dest: str | os.PathLike, sha256: str | None = None, *, progress: bool | None = None,
                 retries: int = 3, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (kept if it already exists), resuming and verifying; returns ``dest``.

    Args:
        sha256: expected hex digest; on a mismatch the partial file is deleted and :class:`HubError` raised.
        progress: show a tqdm bar (None: only on an interactive terminal).
        retries: resumptions attempted after an interrupted transfer within this call.
        timeout: socket timeout in seconds.
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        return dest
    if is_offline():
        raise _unreachable(url, dest, f"offline mode: {OFFLINE_ENV}=1")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):
        if not dest.is_file():  # another process may have finished it while we waited
            _download_locked(url, dest, sha256, progress, retries, timeout)
    return dest


def _download_locked(url: str, dest: Path, sha256: str | None, progress: bool | None, retries: int,
                     timeout: float) -> None:
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
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _unreachable(url, dest, f"network error: {getattr(exc, 'reason', exc)}") from None
    if sha256:
        digest = sha256_file(partial)
        if digest != sha256.lower():
            partial.unlink()
            raise HubError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}. The download was "
                           "deleted; try again, and check the mirror if SSL_DISTILL_BASE_URL is set.")
    os.replace(partial, dest)
    _fsync_dir(dest.parent)
    logger.info("downloaded %s to %s", url, dest)


def download(name: str | ModelEntry, dest_dir: str | os.PathLike | None = None, *, progress: bool | None = None,
             base_url: str | None = None) -> Path:
    """Download a zoo model's weights into ``dest_dir`` (default :func:`weights_dir`) and return the file path."""
    entry = get_model(name)
    url = entry.url(base_url)
    dest = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    return download_url(url, dest / str(entry.filename), entry.sha256, progress=progress)


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
