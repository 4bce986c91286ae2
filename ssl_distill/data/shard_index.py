"""Where shards are and what is in them: shard specs, the shard list, per-shard member tables, the URL cache.

A shard is a plain (WebDataset-style) tar file: each sample is a group of members sharing a key, an image
``<key>.jpg`` (any of :data:`~ssl_distill.data.datasets.IMG_EXTENSIONS`) and, when labelled, ``<key>.cls`` (the
class index as text). Random access by sample index needs to know where each image's bytes are, so
``ssl-distill shards`` writes beside the shards:

* ``index.json`` — the **shard list**, in the ``wids`` shard-index layout (``{"__kind__": "wids-shard-index-v1",
  "shardlist": [{"url", "nsamples", "filesize"}]}``) so other readers can use it, plus our fields: each shard's
  sha256 and member table, the class names and the source it was packed from;
* ``<shard>.idx.npy`` — the shard's **member table**, a NumPy structured array (:func:`make_table`), one row per
  sample: name, offset of its tar header, offset of its data, size, crc32, label. It is memory-mapped, not parsed:
  a worker touching every shard of ImageNet-22k holds no per-sample Python objects, and the pages are shared by
  all processes of a node through the page cache.

A spec (``train.dataset_path``, the evaluation datasets) names shards as a brace pattern
(``/data/train-{000000..000999}.tar``), a single ``.tar``, a folder holding ``index.json`` or ``.tar`` files, or a
shard-list file (``*.json``); each may be an ``http(s)://`` URL, whose files are downloaded once into the cache
(``$SSL_DISTILL_HOME/shards``, verified and atomic, through :func:`ssl_distill.hub.download.download_url`). Shards
without a member table (made by other tools) are scanned once per process, headers only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import UNLABELLED, DatasetError, is_image_file

INDEX_NAME = "index.json"
MEMBER_SUFFIX = ".idx.npy"
INDEX_KIND = "wids-shard-index-v1"
FORMAT_VERSION = 1
# A member table row (``table[i].tolist()``): name (bytes), offset of its tar header, offset of its data, data size,
# crc32 (-1: unknown), label.
NAME, HEADER, DATA, SIZE, CRC, LABEL = range(6)
_FIELDS = [("header", "<u8"), ("data", "<u8"), ("size", "<u8"), ("crc", "<i8"), ("label", "<i8")]
_BRACE = re.compile(r"\{([^{}]*)\}")


class ShardError(DatasetError):
    """A shard that is missing, truncated or corrupted; the message names the shard and what to do."""


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept); ``{x,y}`` lists; nested ok."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if ".." in body:
        low, _, high = body.partition("..")
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise DatasetError(f"brace range {{{body}}} in {pattern!r} is not {{FIRST..LAST}} with FIRST <= LAST, "
                               "e.g. train-{000000..000099}.tar")
        width = len(low) if low.startswith("0") else 0
        choices = [f"{i:0{width}d}" for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def is_shard_spec(path: str | os.PathLike) -> bool:
    """Whether a dataset path names shards (see the module docstring) rather than an image folder or list."""
    text = os.fspath(path)
    if is_url(text) or _BRACE.search(text):
        return True
    if text.endswith((".tar", ".json")):
        return True
    p = Path(text).expanduser()
    if not p.is_dir():
        return False
    names = os.listdir(p)
    if INDEX_NAME in names:
        return True
    has_tar = any(n.endswith(".tar") for n in names)
    return has_tar and not any(is_image_file(n) or (p / n).is_dir() for n in names if not n.startswith("."))


@dataclasses.dataclass
class ShardInfo:
    """One shard: where it is (path or URL), its samples and size when the shard list records them."""

    location: str
    nsamples: int | None = None
    filesize: int | None = None
    sha256: str | None = None
    table: str | None = None  # where its member table is (path or URL), None: beside the shard if present
    table_sha256: str | None = None


@dataclasses.dataclass
class ShardList:
    """The shards of a spec, in order, and the class names (``[]`` when unlabelled or unknown)."""

    spec: str
    shards: list[ShardInfo]
    classes: list[str]
    labelled: bool | None = None  # None: not recorded (shards made by other tools)


def _join(base: str, name: str) -> str:
    if is_url(name) or os.path.isabs(name):
        return name
    return urllib.parse.urljoin(base, name) if is_url(base) else os.path.join(os.path.dirname(base), name)


def read_shard_list(location: str) -> ShardList:
    """Parse a shard-list file (``index.json`` written by ``ssl-distill shards``, or any wids shard index)."""
    local = fetch(location, what="shard list")
    try:
        doc = json.loads(Path(local).read_text(encoding="utf-8"))
        entries = doc["shardlist"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{location!r} is not a shard list (a JSON file with a 'shardlist' of shards, as "
                           f"`ssl-distill shards` writes in {INDEX_NAME}): {type(err).__name__}: {err}") from None
    ours = doc.get("ssl_distill", {})
    shards = [ShardInfo(_join(location, e["url"]), e.get("nsamples"), e.get("filesize"), e.get("sha256"),
                        _join(location, e["table"]) if e.get("table") else None, e.get("table_sha256"))
              for e in entries]
    if not shards:
        raise DatasetError(f"shard list {location!r} lists no shards; pack images with `ssl-distill shards`.")
    return ShardList(location, shards, list(ours.get("classes", [])), ours.get("labelled"))


def resolve_spec(spec: str | os.PathLike) -> ShardList:
    """The shards a dataset path names (see the module docstring); missing local files are one clear error."""
    text = os.fspath(spec)
    if not is_url(text):
        text = os.path.expanduser(text)
    if text.endswith(".json"):
        return read_shard_list(text)
    if not is_url(text) and os.path.isdir(text):
        if os.path.isfile(os.path.join(text, INDEX_NAME)):
            return read_shard_list(os.path.join(text, INDEX_NAME))
        names = sorted(n for n in os.listdir(text) if n.endswith(".tar") and not n.startswith("."))
        return ShardList(text, [ShardInfo(os.path.join(text, n)) for n in names], [])
    locations = expand_braces(text)
    if not is_url(text):
        missing = [p for p in locations if not os.path.isfile(p)]
        if missing:
            raise ShardError(f"{len(missing)} of the {len(locations)} shards of {text!r} do not exist, e.g. "
                             f"{missing[:3]}; check the pattern (or pack the images with `ssl-distill shards`).")
    return _with_sibling_index(text, locations)


def _with_sibling_index(spec: str, locations: list[str]) -> ShardList:
    """The shards of a pattern, with what the ``index.json`` beside them records about them (sizes, sha256,
    class names) when there is one; else only what the shards themselves say."""
    sibling = _join(locations[0], INDEX_NAME)
    if fetch(sibling, what="shard list", optional=True) is None:
        return ShardList(spec, [ShardInfo(loc) for loc in locations], [])
    listed = read_shard_list(sibling)
    known = {s.location: s for s in listed.shards}
    if not all(loc in known for loc in locations):
        return ShardList(spec, [ShardInfo(loc) for loc in locations], [])  # another set of shards: trust none of it
    return ShardList(spec, [known[loc] for loc in locations], listed.classes, listed.labelled)


# --------------------------------------------------------------------------------------------- member tables


def make_table(rows: list[list[Any]]) -> np.ndarray:
    """The member table of ``rows`` (``[name, header, data, size, crc32, label]`` each) as a structured array."""
    width = max((len(r[NAME].encode("utf-8", "surrogateescape")) for r in rows), default=1)
    table = np.zeros(len(rows), dtype=[("name", f"S{max(width, 1)}"), *_FIELDS])
    for i, r in enumerate(rows):
        table[i] = (r[NAME].encode("utf-8", "surrogateescape"), *r[1:])
    return table


def table_location(shard: str) -> str:
    """Where a shard's member table sits: ``train-000000.tar`` -> ``train-000000.idx.npy``."""
    return (shard[:-4] if shard.endswith(".tar") else shard) + MEMBER_SUFFIX


def member_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: ``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def scan_tar(path: str) -> np.ndarray:
    """The member table of a tar made by any tool, from its headers (the data is skipped, not read, except the
    small ``.cls`` members); crc32 is -1 (unknown). Samples are the image members, in archive order."""
    rows: dict[str, list[Any]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = member_key(info.name)
                if ext.lower() == "cls":
                    labels[key] = int(tar.extractfile(info).read().decode().strip())
                elif is_image_file(info.name) and key not in rows:
                    rows[key] = [info.name, info.offset, info.offset_data, info.size, -1, UNLABELLED]
    except (tarfile.TarError, OSError, ValueError) as err:
        raise ShardError(f"cannot read shard {path!r} as a tar archive ({type(err).__name__}: {err}); the file is "
                         "truncated or corrupted: copy it again, or re-pack it with `ssl-distill shards`.") from None
    for key, row in rows.items():
        row[LABEL] = labels.get(key, UNLABELLED)
    return make_table(list(rows.values()))


def load_table(info: ShardInfo) -> tuple[str, np.ndarray, int | None]:
    """(local shard path, member table, expected file size) of one shard: the table from its ``.idx.json`` when
    there is one, else scanned from the tar's headers."""
    local = fetch(info.location, info.sha256, info.filesize, what="shard")
    table_at = info.table or table_location(info.location)
    table_file = fetch(table_at, info.table_sha256, what="member table", optional=info.table is None)
    if table_file is None:
        return local, scan_tar(local), info.filesize
    try:
        members = np.load(table_file, mmap_mode="r", allow_pickle=False)
        if members.dtype.names != ("name", *(f for f, _ in _FIELDS)):
            raise ValueError(f"columns {members.dtype.names}")
    except (OSError, ValueError) as err:
        raise ShardError(f"member table {table_at!r} of shard {info.location!r} is unreadable ({type(err).__name__}:"
                         f" {err}); re-pack the shards with `ssl-distill shards`.") from None
    if info.nsamples is not None and len(members) != info.nsamples:
        raise ShardError(f"member table {table_at!r} lists {len(members)} samples but the shard list records "
                         f"{info.nsamples} for {info.location!r}; the index is out of date: re-pack the shards.")
    return local, members, info.filesize


# --------------------------------------------------------------------------------------------- URL cache


def shard_cache_dir() -> Path:
    """Where shards given as URLs are cached: ``$SSL_DISTILL_HOME/shards`` (default ``~/.cache/ssl_distill``)."""
    from ssl_distill.hub.download import cache_dir

    return cache_dir() / "shards"


def fetch(location: str, sha256: str | None = None, size: int | None = None, *, what: str = "file",
          optional: bool = False) -> str | None:
    """A local path for ``location``: a URL is downloaded once into :func:`shard_cache_dir` (verified against
    ``sha256``/``size`` when known, resumable, atomic); a local path must exist. ``optional``: None if absent."""
    if not is_url(location):
        if os.path.isfile(location):
            return location
        if optional:
            return None
        raise ShardError(f"{what} {location!r} does not exist; check the dataset path (or pack the images with "
                         "`ssl-distill shards`).")
    from ssl_distill.hub.download import download_url
    from ssl_distill.hub.registry import HubError

    parsed = urllib.parse.urlparse(location)
    folder = hashlib.sha256(location.rpartition("/")[0].encode()).hexdigest()[:16]  # one folder per URL folder
    dest = shard_cache_dir() / folder / Path(urllib.parse.unquote(parsed.path)).name
    try:
        return str(download_url(location, dest, sha256, size=size, progress=False))
    except HubError as err:
        if optional and "HTTP 404" in str(err):
            return None
        raise ShardError(f"cannot fetch {what} {location}: {err}") from None
