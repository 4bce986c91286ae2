"""Pack an image folder (or list file) into indexed tar shards: ``ssl-distill shards SRC OUT``.

The samples are those :func:`~ssl_distill.data.datasets.build_image_dataset` reads from ``SRC``, in the same order,
so training on ``OUT`` sees the same images at the same indices as training on ``SRC``. Each image is stored with
its original bytes as ``<key>.<ext>`` (``key`` = its index in ``SRC``, 9 digits), its label as ``<key>.cls`` when
``SRC`` is a class-folder tree; a shard is closed before the next image would take it past ``shard_size`` bytes
(a larger image gets a shard of its own). Every image is decoded
first (in ``workers`` processes); an unreadable one stops the packing (``bad_image_policy="error"``) or is left out
with a warning and listed in the summary (``"skip"``).

Resumable: a shard, then its member table, then ``OUT/.pack_state.json`` are written atomically when the shard is
complete, so a run that is interrupted (or killed) continues after the last complete shard when started again
with the same ``SRC``; the shard list ``OUT/index.json`` is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ssl_distill.fileio import atomic_open, atomic_write_text, remove_stale_temp_files

from .datasets import BrokenImageError, DatasetError, ImageDataset, _check_policy, build_image_dataset, load_rgb
from .shard_index import FORMAT_VERSION, INDEX_KIND, INDEX_NAME, MEMBER_SUFFIX, is_shard_spec, make_table

logger = logging.getLogger(__name__)
STATE_NAME = ".pack_state.json"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"256MB"`` / ``"256M"`` / ``"256MiB"`` -> bytes (binary multiples); a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {text!r} is not a size like 256MB, 1GB or 500000 (bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclasses.dataclass
class PackSummary:
    """What :func:`pack_shards` did: counts, where, and the images it left out."""

    out: str
    images: int
    shards: int
    bytes: int
    classes: list[str]
    bad: list[list[str]]  # [file, reason] of every image left out
    resumed_shards: int
    seconds: float

    def lines(self) -> list[str]:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        out = [f"packed {self.images} images ({kind}) into {self.shards} shards, {self.bytes / 2**20:.1f} MiB, in "
               f"{self.out} ({self.seconds:.1f} s" + (f"; {self.resumed_shards} shards kept from an interrupted "
                                                      "run)" if self.resumed_shards else ")")]
        if self.bad:
            shown = ", ".join(f"{path} ({why})" for path, why in self.bad[:5])
            out.append(f"{len(self.bad)} unreadable images left out (bad_image_policy=skip): {shown}"
                       + (" ..." if len(self.bad) > 5 else ""))
        out.append(f"shard list: {os.path.join(self.out, INDEX_NAME)}; train with train.dataset_path={self.out}")
        return out


def _check_image(path: str) -> tuple[bytes | None, str]:
    """The file's bytes when it decodes (strictly, as training decodes it), else None and the reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        load_rgb(io.BytesIO(data))
        return data, ""
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        return None, f"{type(err).__name__}: {err}"


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (the shard's sha256, no re-read)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class _ShardWriter:
    """One shard being written: tar members appended, its member table kept; :meth:`commit` makes it durable."""

    def __init__(self, out: Path, number: int, first: int, labelled: bool) -> None:
        self.name = f"shard-{number:06d}.tar"
        self.first = self.next = first
        self.labelled = labelled
        self.members: list[list[Any]] = []
        self.bad: list[list[str]] = []
        self._ctx = atomic_open(out / self.name, "wb")
        self._writer = _HashingWriter(self._ctx.__enter__())
        self._tar = tarfile.open(fileobj=self._writer, mode="w", format=tarfile.USTAR_FORMAT)

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # no time stamps: the same input packs the same
        header = self._writer.tell()
        self._tar.addfile(info, io.BytesIO(data))
        return header, header + len(info.tobuf(tarfile.USTAR_FORMAT))

    def add(self, index: int, path: str, data: bytes, label: int) -> None:
        key = f"{index:09d}"
        ext = os.path.splitext(path)[1].lower() or ".img"
        header, start = self._add(key + ext, data)
        self.members.append([key + ext, header, start, len(data), zlib.crc32(data), label])
        if self.labelled:
            self._add(key + ".cls", str(label).encode())
        self.next = index + 1

    def skip(self, index: int, path: str, why: str) -> None:
        self.bad.append([path, why])
        self.next = index + 1

    def would_pass(self, data: bytes, limit: int) -> bool:
        """Whether adding ``data`` (and its label) takes the finished shard (end blocks, record padding) past
        ``limit`` bytes."""
        blocks = 512 + -(-len(data) // 512) * 512 + (1024 if self.labelled else 0)
        final = self._writer.size + blocks + 1024
        return -(-final // tarfile.RECORDSIZE) * tarfile.RECORDSIZE > limit

    def commit(self, out: Path) -> dict[str, Any]:
        """Close the tar, rename it into place, write its member table; the shard's entry for the state."""
        self._tar.close()
        self._ctx.__exit__(None, None, None)
        table_name = self.name[:-4] + MEMBER_SUFFIX
        with atomic_open(out / table_name, "wb") as f:
            writer = _HashingWriter(f)
            np.save(writer, make_table(self.members), allow_pickle=False)
        return {"url": self.name, "nsamples": len(self.members), "filesize": self._writer.size,
                "sha256": self._writer.sha.hexdigest(), "table": table_name,
                "table_sha256": writer.sha.hexdigest(), "first": self.first, "next": self.next,
                "bad": self.bad}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file


def _source_id(ds: ImageDataset, src: Path) -> str:
    h = hashlib.sha256(f"{ds.classes}|".encode("utf-8", "surrogatepass"))
    for path, label in ds.samples:
        h.update(f"{os.path.relpath(path, src if src.is_dir() else src.parent)}|{label}\n"
                 .encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _load_state(out: Path, source_id: str, shard_size: int, src: str) -> list[dict[str, Any]]:
    """The complete shards of an interrupted run with the same source (their files present, full size)."""
    state_path = out / STATE_NAME
    if not state_path.is_file():
        if any(p.suffix == ".tar" for p in out.iterdir()) or (out / INDEX_NAME).exists():
            raise DatasetError(f"{str(out)!r} already holds shards not written by an interrupted `ssl-distill shards`"
                               " run; choose an empty OUT folder or delete those files.")
        return []
    state = json.loads(state_path.read_text(encoding="utf-8"))
    if state.get("source_id") != source_id or state.get("shard_size") != shard_size:
        raise DatasetError(
            f"{str(out)!r} holds shards packed from another source ({state.get('source')!r}) or with another "
            f"--shard-size ({state.get('shard_size')} bytes); choose an empty OUT folder, or delete it to re-pack "
            f"{src!r}.")
    kept = []
    for entry in state["shards"]:
        shard = out / entry["url"]
        if not (shard.is_file() and shard.stat().st_size == entry["filesize"] and (out / entry["table"]).is_file()):
            break
        kept.append(entry)
    return kept


def _save_state(out: Path, source_id: str, shard_size: int, src: str, shards: list[dict[str, Any]]) -> None:
    atomic_write_text(out / STATE_NAME, json.dumps({"source_id": source_id, "shard_size": shard_size, "source": src,
                                                    "shards": shards}, indent=1))


@contextlib.contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    with open(out / ".pack.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"another `ssl-distill shards` is writing into {str(out)!r}; wait for it to finish or"
                               " choose another OUT folder.") from None
        yield


def _checked_images(paths: list[str], workers: int) -> Iterator[tuple[bytes | None, str]]:
    """:func:`_check_image` of each path, in order, in ``workers`` processes (0 or 1: in this one)."""
    if workers <= 1:
        yield from map(_check_image, paths)
        return
    with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        yield from pool.imap(_check_image, paths, chunksize=8)


def _progress(total: int, initial: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="packing", unit="img")


def pack_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 256 << 20, workers: int = 4,
                bad_image_policy: str = "error", progress: bool | None = None) -> PackSummary:
    """Pack ``src`` into shards in ``out`` (see the module docstring); resumes an interrupted run into ``out``."""
    _check_policy(bad_image_policy)
    if is_shard_spec(src):
        raise DatasetError(f"{os.fspath(src)!r} is already shards; `ssl-distill shards` packs an image folder, a "
                           "class-folder tree or a list file of images.")
    t0, src_path, out = time.perf_counter(), Path(src).expanduser(), Path(out).expanduser()
    ds = build_image_dataset(src_path, bad_image_policy=bad_image_policy)
    out.mkdir(parents=True, exist_ok=True)
    with _out_lock(out):
        remove_stale_temp_files(out)
        source_id = _source_id(ds, src_path)
        shards = _load_state(out, source_id, shard_size, str(src_path))
        resumed = len(shards)
        _pack_from(ds, out, shards, shard_size, workers, bad_image_policy, progress,
                   lambda done: _save_state(out, source_id, shard_size, str(src_path), done))
        _write_index(out, shards, ds.classes, str(src_path))
    bad = [b for s in shards for b in s["bad"]]
    return PackSummary(str(out), sum(s["nsamples"] for s in shards), len(shards), sum(s["filesize"] for s in shards),
                       ds.classes, bad, resumed, time.perf_counter() - t0)


def _pack_from(ds: ImageDataset, out: Path, shards: list[dict[str, Any]], shard_size: int, workers: int,
               policy: str, progress: bool | None, save: Any) -> None:
    """Pack the samples after the last complete shard in ``shards``, appending each new shard's entry."""
    start = shards[-1]["next"] if shards else 0
    samples = ds.samples[start:]
    labelled = bool(ds.classes)
    writer: _ShardWriter | None = None
    try:
        with _progress(len(ds), start, progress) as bar:
            checked = _checked_images([p for p, _ in samples], workers)
            for offset, ((path, label), (data, why)) in enumerate(zip(samples, checked)):
                index = start + offset
                if writer is not None and data is not None and writer.members and writer.would_pass(data, shard_size):
                    shards.append(writer.commit(out))
                    save(shards)
                    writer = None
                if writer is None:
                    writer = _ShardWriter(out, len(shards), index, labelled)
                if data is None:
                    if policy == "error":
                        raise BrokenImageError(f"cannot decode image {path!r} ({why}). Fix or remove the file, or "
                                               "pack with --bad-image-policy skip to leave unreadable images out.")
                    logger.warning("Unreadable image %s (%s); left out of the shards (bad_image_policy=skip).",
                                   path, why)
                    writer.skip(index, path, why)
                else:
                    writer.add(index, path, data, label)
                if bar is not None:
                    bar.update(1)
        if writer is not None and writer.members:
            shards.append(writer.commit(out))
            save(shards)
            writer = None
        elif writer is not None and shards:  # trailing unreadable images: they belong to the last shard's range
            shards[-1]["bad"] += writer.bad
            shards[-1]["next"] = writer.next
            save(shards)
    finally:
        if writer is not None:
            writer.abort()
    if not shards:
        raise DatasetError(f"no readable image in {ds.root!r}; nothing was packed.")


def _write_index(out: Path, shards: list[dict[str, Any]], classes: list[str], src: str) -> None:
    entries = [{k: s[k] for k in ("url", "nsamples", "filesize", "sha256", "table", "table_sha256")} for s in shards]
    doc = {"__kind__": INDEX_KIND, "wids_version": 1, "name": out.name, "shardlist": entries,
           "ssl_distill": {"version": FORMAT_VERSION, "classes": classes, "labelled": bool(classes), "source": src}}
    atomic_write_text(out / INDEX_NAME, json.dumps(doc, indent=1))
