"""Verified, resumable, atomic downloads into the model cache.

* cache: ``$SSL_DISTILL_HOME/checkpoints`` (default ``~/.cache/ssl_distill/checkpoints``); a file in the cache is
  used without touching the network.
* resume: bytes arrive in ``<file>.partial``; an interrupted transfer is retried with an HTTP ``Range`` request
  (also by the next run), a server that ignores ``Range`` restarts the file.
* atomic: the finished ``.partial`` is fsynced, verified and renamed into place, so the cache only ever holds
  complete files; a ``<file>.lock`` (POSIX ``flock``) makes processes sharing a cache download a file once.
* verification, before a file enters the cache: its size against the server's ``Content-Length``, the registry's
  exact ``size`` or ``min_size`` (the fp32 tensor data of the entry's parameters), the CRC of every member of a
  PyTorch zip archive, and the sha256 when known; weights (zoo names, weights URLs) must also start like a weights
  file (a zip archive, a pickle or safetensors), so an HTML login or error page answered with status 200 is refused
  (naming its Content-Type). A file that fails is deleted, never cached.
* verification on use: the size, mtime and sha256 of a verified file are recorded beside it (``<file>.verified``).
  A cached file is hashed again when it is at most :data:`ALWAYS_HASH_BYTES` (bit rot keeps size and mtime), when
  its size or mtime differ from the record, or when the record is missing or unreadable (then it is rewritten,
  from the expected sha256 when known); a cached file whose size, hash or zip directory no longer matches is
  downloaded again (offline: refused with the fix). Larger unchanged files are trusted on size + mtime + their zip
  directory, so a multi-GB backbone is not read twice per start.
* offline: ``SSL_DISTILL_OFFLINE=1`` (or a network failure) uses the cache or fails saying what to download where.
* mirrors: ``SSL_DISTILL_BASE_URL`` replaces the zoo's base URL (see :meth:`ModelEntry.url`).
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from ssl_distill.fileio import _fsync_dir, atomic_write_text, format_bytes, free_bytes
from ssl_distill.hub.registry import HubError, ModelEntry, get_model

logger = logging.getLogger(__name__)

HOME_ENV = "SSL_DISTILL_HOME"
OFFLINE_ENV = "SSL_DISTILL_OFFLINE"
_CHUNK = 1 << 20
ALWAYS_HASH_BYTES = 512 << 20  # cached files up to this size are re-hashed on every use (about 0.3 s per 512 MiB)
_HEX = frozenset("0123456789abcdef")


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


def _fetch(url: str, partial: Path, timeout: float, progress: bool | None) -> str:
    """One HTTP request appending to (or restarting) ``partial``; raises :class:`_Interrupted` on a short read.
    Returns the response's ``Content-Type`` (``""`` when the server sends none)."""
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
        content_type = resp.headers.get("Content-Type", "")
    size = partial.stat().st_size
    if total is not None and size < total:
        raise _Interrupted(f"connection closed after {size} of {total} bytes")
    return content_type


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
                 retries: int = 3, timeout: float = 30.0, min_size: int = 0, size: int | None = None,
                 weights: bool = False) -> Path:
    """Download ``url`` to ``dest`` (a cached copy that passes verification is kept), resuming and verifying.

    Args:
        sha256: expected hex digest; on a mismatch the partial file is deleted and :class:`HubError` raised.
        progress: show a tqdm bar (None: only on an interactive terminal).
        retries: resumptions attempted after an interrupted transfer within this call.
        timeout: socket timeout in seconds.
        min_size / size: bytes a complete file has at least / exactly (see the module docstring).
        weights: the file must start like a weights file (zip, pickle or safetensors), e.g. not an HTML page.
    """
    dest = Path(dest).expanduser()
    check = _Check(sha256.lower() if sha256 else None, min_size, size, weights)
    if dest.is_file():
        problems = _cached_problems(dest, check)
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
        if dest.is_file() and _cached_problems(dest, check):
            dest.unlink()  # a bad cached copy (another process may have replaced it with a good one meanwhile)
            _record_path(dest).unlink(missing_ok=True)
        if not dest.is_file():
            _download_locked(url, dest, check, progress, retries, timeout)
    return dest


@dataclasses.dataclass(frozen=True)
class _Check:
    """What a complete file must satisfy: its sha256 (lower case) and sizes when known, and a weights file's start."""

    sha256: str | None
    min_size: int = 0
    size: int | None = None
    weights: bool = False


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _read_record(dest: Path) -> dict[str, Any] | None:
    """What was recorded when ``dest`` was downloaded and verified: ``{}`` when there is no record (a file copied in
    by hand), None when the record is unreadable or malformed (it is rewritten after the file is checked)."""
    try:
        record = json.loads(_record_path(dest).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    valid = (isinstance(record, dict) and isinstance(record.get("size"), int)
             and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64
             and set(record["sha256"]) <= _HEX and isinstance(record.get("mtime_ns", 0), int))
    return record if valid else None


def _write_record(dest: Path, digest: str, url: str | None, stat: os.stat_result) -> None:
    """Record ``dest``'s size, mtime and sha256 beside it, atomically; a read-only cache just keeps no record."""
    record = {"size": stat.st_size, "sha256": digest, "url": url, "mtime_ns": stat.st_mtime_ns}
    try:
        atomic_write_text(_record_path(dest), json.dumps(record) + "\n")
    except OSError as exc:
        logger.debug("cannot write %s (%s); the file is re-hashed on its next use", _record_path(dest), exc)


def _weights_magic_problem(path: Path) -> str | None:
    """Why ``path`` does not start like a weights file (a zip archive, a pickle or safetensors), or None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save zip archive; legacy torch.save / pickle (protocol 2+)
        return None
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return None  # safetensors: an 8-byte header length, then the JSON header
    shown = head.decode("ascii", "replace").replace("\ufffd", "?").split("\n")[0].strip()[:40]
    return f"it is not a weights file (a zip, pickle or safetensors file): it starts with {shown!r}"


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


def _cheap_problems(path: Path, check: _Check, record: dict[str, Any]) -> list[str]:
    """Reasons ``path`` is not a complete copy, from its size, first bytes and zip directory (no full read)."""
    n, problems = path.stat().st_size, []
    if check.size is not None and n != check.size:
        problems.append(f"it is {n} bytes, the registry records {check.size}")
    elif n < check.min_size:
        problems.append(f"it is {n} bytes, shorter than the {check.min_size} bytes of a complete file")
    if record.get("size") not in (None, n):
        problems.append(f"it is {n} bytes, but had {record['size']} when it was downloaded and verified")
    if check.sha256 and record.get("sha256") not in (None, check.sha256):
        problems.append(f"its recorded sha256 {record['sha256']} is not the expected {check.sha256}")
    if check.weights and (magic_problem := _weights_magic_problem(path)) is not None:
        problems.append(magic_problem)
    elif (zip_problem := _zip_problem(path, check_crc=False)) is not None:
        problems.append(zip_problem)
    return problems


def _cached_problems(path: Path, check: _Check) -> list[str]:
    """Reasons the cached ``path`` cannot be used (empty: use it). Verified on use: the cheap checks, then the
    sha256 when the file is small, changed since its record, or has no usable record (see the module docstring);
    a missing, malformed or outdated record of a file that passes is (re)written."""
    record = _read_record(path)
    if record is None:
        logger.warning("the verification record %s is unreadable or malformed; checking %s again and rewriting it",
                       _record_path(path), path)
    problems = _cheap_problems(path, check, record or {})
    if problems:
        return problems
    stat = path.stat()
    unchanged = bool(record) and record.get("mtime_ns") == stat.st_mtime_ns
    if unchanged and stat.st_size > ALWAYS_HASH_BYTES:
        return []
    digest = sha256_file(path)
    expected = (record or {}).get("sha256") or check.sha256
    if expected is not None and digest != expected:
        when = "recorded when it was downloaded" if record else "expected"
        return [f"its sha256 is {digest}, not the {expected} {when} (the file changed on disk)"]
    if not unchanged:
        _write_record(path, digest, (record or {}).get("url"), stat)
    return []


def _download_locked(url: str, dest: Path, check: _Check, progress: bool | None, retries: int,
                     timeout: float) -> None:
    partial = _partial_path(dest)
    content_type = ""
    for attempt in range(retries + 1):
        try:
            content_type = _fetch(url, partial, timeout, progress)
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
                raise _cache_full(url, partial, check.size) from None
            raise _unreachable(url, dest, f"network error: {getattr(exc, 'reason', exc)}") from None
        except http.client.HTTPException as exc:
            raise _unreachable(url, dest, f"network error: {exc}") from None
    problems = _cheap_problems(partial, dataclasses.replace(check, sha256=None), {})
    if not problems and (zip_problem := _zip_problem(partial, check_crc=True)) is not None:
        problems.append(zip_problem)
    digest = ""
    if not problems:
        digest = sha256_file(partial)
        if check.sha256 and digest != check.sha256:
            problems.append(f"its sha256 is {digest}, expected {check.sha256}")
    if problems:
        partial.unlink()
        served = f"; the server sent it as {content_type.split(';')[0]}" if content_type.startswith("text/") else ""
        raise HubError(f"the download of {url} fails verification ({'; '.join(problems)}{served}). It was deleted, "
                       "nothing was cached; try again, and check the URL (a login or error page?) and the mirror if "
                       "SSL_DISTILL_BASE_URL is set.")
    stat = partial.stat()
    _write_record(dest, digest, url, stat)
    os.replace(partial, dest)
    _fsync_dir(dest.parent)
    logger.info("downloaded %s to %s (%d bytes, sha256 %s)", url, dest, stat.st_size, digest)


def download(name: str | ModelEntry, dest_dir: str | os.PathLike | None = None, *, progress: bool | None = None,
             base_url: str | None = None) -> Path:
    """Download a zoo model's weights into ``dest_dir`` (default :func:`weights_dir`) and return the file path."""
    entry = get_model(name)
    url = entry.url(base_url)
    dest = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    return download_url(url, dest / str(entry.filename), entry.sha256, progress=progress, min_size=entry.min_size,
                        size=entry.size, weights=True)


def resolve_weights(weights: str | os.PathLike, *, progress: bool | None = None) -> Path:
    """A local path for ``weights``: an ``http(s)://`` URL is downloaded into the cache, ``file://`` and plain
    paths must exist."""
    text = str(weights)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("http", "https"):
        name = Path(urllib.parse.unquote(parsed.path)).name or "weights.pth"
        key = hashlib.sha256(text.encode()).hexdigest()[:12]  # same basename at different URLs: different files
        return download_url(text, weights_dir() / "urls" / f"{key}-{name}", progress=progress, weights=True)
    path = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(text).expanduser()
    if not path.is_file():
        raise HubError(f"weights file '{path}' does not exist; pass a file path, an http(s) URL or a model name")
    return path
