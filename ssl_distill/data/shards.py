"""Images read from indexed tar shards by sample index: the same dataset contract as a folder, O(shards) file opens.

:class:`ShardDataset` is an :class:`~ssl_distill.data.datasets.ImageDataset` whose samples live in tar shards (see
:mod:`~ssl_distill.data.shard_index` for the layout and the specs accepted). Sample ``i`` is found through the
index: the shard holding it (cumulative sample counts), then its row of the shard's member table (where its tar
header and bytes are). One ``pread`` returns the header and the image bytes; nothing else of the shard is read. So
the sampler, the seeded augmentation, exact resume and rank equality work exactly as on a folder, and a folder and
the shards packed from it (same order) give bit-identical batches.

Each process (every DataLoader worker) opens a shard on first use and keeps up to ``max_open`` shards open (least
recently used closed first): an epoch costs one ``open`` + ``fstat`` per shard and worker instead of one ``open``
per image, and the start-up reads one shard list instead of listing every image.

Integrity, checked through the index: a shard whose size differs from the recorded size (truncated, replaced), a
member whose tar header is not where the table says, or whose bytes fail their crc32, raises
:class:`~ssl_distill.data.shard_index.ShardError` naming the shard, whatever the policy (the shard is damaged; the
fix is to copy or pack it again). An intact member that does not decode follows ``bad_image_policy`` like a
broken file in a folder.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import io
import os
import zlib
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from PIL import Image

from .datasets import UNLABELLED, DatasetError, ImageDataset, _check_policy
from .shard_index import CRC, DATA, HEADER, LABEL, NAME, SIZE, ShardError, ShardList, load_table, resolve_spec


def _default_max_open() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(8, min(1024, soft // 8))  # a worker's share of the descriptors, leaving room for torch's own


class ShardDataset(ImageDataset):
    """``(image, label)`` by sample index from tar shards; see the module docstring and :class:`ImageDataset`.

    ``samples`` (built on first use) names each sample ``<shard>#<member>``; ``classes`` are the class names the
    packer recorded (``.cls`` numbers as names for shards made elsewhere).
    """

    def __init__(self, shard_list: ShardList, transform: Callable[[Image.Image], Any] | None = None,
                 bad_image_policy: str = "skip", return_broken_flag: bool = False, labelled: bool | None = None,
                 max_open: int | None = None) -> None:
        _check_policy(bad_image_policy)
        self.shard_list = shard_list
        self.transform = transform
        self.bad_image_policy = bad_image_policy
        self.return_broken_flag = return_broken_flag
        self.root = shard_list.spec
        self.max_open = max_open or _default_max_open()
        self._broken_paths: set[str] = set()
        self._tables: dict[int, tuple[str, np.ndarray, int | None]] = {}
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._labels: list[int] | None = None  # set when evaluation re-indexes the classes (``samples = ...``)
        counts = [s.nsamples if s.nsamples is not None else len(self._table(i)[1])
                  for i, s in enumerate(shard_list.shards)]
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        if self._starts[-1] == 0:
            raise DatasetError(f"the shards of {self.root!r} hold no images (members ending in one of "
                               ".jpg .png ...); pack a folder of images with `ssl-distill shards`.")
        self.labelled, self.classes = self._label_layout(labelled)

    def _label_layout(self, labelled: bool | None) -> tuple[bool, list[str]]:
        recorded = self.shard_list.labelled
        if recorded is None:  # made by another tool: labelled when every sample has a .cls member
            labels = np.concatenate([self._table(i)[1]["label"] for i in range(len(self.shard_list.shards))])
            recorded = bool(labels.min() >= 0)
            classes = [str(c) for c in range(int(labels.max()) + 1)] if recorded else []
        else:
            classes = list(self.shard_list.classes)
        if labelled and not recorded:
            raise DatasetError(f"labelled=True, but the shards of {self.root!r} hold no class labels (.cls members);"
                               " pack a class-folder tree (<root>/<class>/<image>) with `ssl-distill shards`.")
        if labelled is False or not recorded:
            return False, []
        return True, classes

    # ------------------------------------------------------------------------------------------- index

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, tuple[Any, ...]]:
        """The shard of sample ``index`` and its member-table row (Python values, see ``shard_index.NAME``)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, self._table(shard)[1][index - self._starts[shard]].tolist()

    def _table(self, shard: int) -> tuple[str, np.ndarray, int | None]:
        if shard not in self._tables:
            self._tables[shard] = load_table(self.shard_list.shards[shard])
        return self._tables[shard]

    def _sample(self, index: int) -> tuple[str, int]:
        shard, row = self._locate(index)
        label = self._labels[index] if self._labels is not None else row[LABEL] if self.labelled else UNLABELLED
        return f"{self.shard_list.shards[shard].location}#{row[NAME].decode('utf-8', 'surrogateescape')}", label

    @property
    def samples(self) -> list[tuple[str, int]]:  # type: ignore[override]
        """``(<shard>#<member>, label)`` of every sample (reads every member table)."""
        return [self._sample(i) for i in range(len(self))]

    @samples.setter
    def samples(self, samples: list[tuple[str, int]]) -> None:
        if len(samples) != len(self):
            raise ValueError(f"{len(samples)} samples given for a dataset of {len(self)}; only labels may change")
        self._labels = [int(label) for _, label in samples]

    @property
    def targets(self) -> list[int]:
        return [self._sample(i)[1] for i in range(len(self))]

    def fingerprint(self) -> str:
        """sha256 over the shards' identities (recorded sha256, else size and mtime), classes and labels."""
        h = hashlib.sha256(f"{self.root}|{self.classes}|{self._labels}|".encode("utf-8", "surrogatepass"))
        for shard in self.shard_list.shards:
            stamp = shard.sha256
            if stamp is None:
                try:
                    st = os.stat(shard.location)
                    stamp = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    stamp = "missing"
            h.update(f"{shard.location}|{stamp}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------- reading

    def _fd(self, shard: int) -> int:
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        local, members, size = self._table(shard)
        fd = os.open(local, os.O_RDONLY)
        actual = os.fstat(fd).st_size
        end = int((members["data"] + members["size"]).max()) if len(members) else 0
        if (size is not None and actual != size) or actual < end:
            os.close(fd)
            expected = f"its index records {size}" if size is not None else f"its members end at byte {end}"
            raise ShardError(
                f"shard {self.shard_list.shards[shard].location!r} is {actual} bytes but {expected}: it is truncated "
                "or was replaced after indexing. Copy it again, or re-pack with `ssl-distill shards`.")
        while len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def _read(self, index: int, path: str) -> IO[bytes]:
        """The bytes of sample ``index``, after checking its tar header and crc32 against the member table."""
        shard, row = self._locate(index)
        start, size = row[HEADER], row[SIZE]
        buf = os.pread(self._fd(shard), row[DATA] + size - start, start)
        data = buf[row[DATA] - start:]
        problem = _member_problem(buf[row[DATA] - start - 512: row[DATA] - start], row, data)
        if problem:
            raise ShardError(
                f"shard {self.shard_list.shards[shard].location!r} is corrupted: member {row[NAME].decode()!r} (sample "
                f"{index}) {problem}. Copy the shard again, or re-pack with `ssl-distill shards`.")
        return io.BytesIO(data)

    def close(self) -> None:
        """Close the open shards (they reopen on the next read)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = collections.OrderedDict()  # descriptors do not travel to spawned workers
        state["_tables"] = {k: v for k, v in self._tables.items() if not isinstance(v[1], np.memmap)}  # re-mapped
        return state

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return (f"ShardDataset({len(self)} images in {len(self.shard_list.shards)} shards, {kind}, "
                f"root={self.root!r}, policy={self.bad_image_policy!r})")


def _header_fields(header: bytes) -> tuple[str, int] | None:
    """(name, size) from a ustar/GNU header block, read field by field (``TarInfo.frombuf`` costs 15 us, as much
    as the rest of a read); None when the block is no tar header."""
    if header[257:262] != b"ustar":
        return None
    raw = header[124:136]
    if raw[0] & 0x80:  # base-256 size (members over 8 GiB)
        size = int.from_bytes(raw[1:], "big")
    else:
        try:
            size = int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    full = prefix + b"/" + name if prefix else name
    return full.decode("utf-8", "surrogateescape"), size


def _member_problem(header: bytes, row: tuple[Any, ...], data: bytes) -> str | None:
    """Why a member read at its recorded place is not the recorded member (None: it is)."""
    if len(data) != row[SIZE] or len(header) != 512:
        return f"ends past the end of the file (expected {row[SIZE]} bytes at byte {row[DATA]})"
    fields = _header_fields(header)
    if fields is None:
        return f"has no valid tar header before byte {row[DATA]}"
    name, size = fields
    extended = row[DATA] - row[HEADER] > 512  # pax / GNU long name: the full name is in the extended header
    if size != row[SIZE] or (not extended and name != row[NAME].decode("utf-8", "surrogateescape")):
        return f"is not at byte {row[DATA]}: the header there names {name!r} ({size} bytes)"
    if row[CRC] >= 0 and zlib.crc32(data) != row[CRC]:
        return f"fails its crc32 check ({zlib.crc32(data):08x}, packed as {row[CRC]:08x})"
    return None


def build_shard_dataset(spec: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                        bad_image_policy: str = "skip", labelled: bool | None = None,
                        return_broken_flag: bool = False) -> ShardDataset:
    """A :class:`ShardDataset` for a shard spec (see :mod:`~ssl_distill.data.shard_index`)."""
    return ShardDataset(resolve_spec(spec), transform, bad_image_policy, return_broken_flag, labelled)
