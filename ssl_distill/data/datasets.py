"""Image datasets: class-folder trees, unlabelled folders, file lists; and a decode policy for broken files.

``build_image_dataset(path)`` turns one path into an :class:`ImageDataset` of ``(file, label)`` samples:

* a **class-folder tree** (torchvision's ``ImageFolder`` layout, as used for ImageNet in DINO/DINOv2,
  Caron et al. 2021, Oquab et al. 2023): ``root/<class>/<image>``, label = index of ``<class>`` in the
  sorted list of class folders;
* an **unlabelled folder**, flat or nested, every label ``-1``;
* a **list file**: a text file naming one image per line, every label ``-1``.

Decoding is strict: every image is fully decoded (``img.load()``) and converted to 8-bit RGB, and a
truncated file counts as broken even when some other library has set PIL's ``LOAD_TRUNCATED_IMAGES``.
What happens to a broken file is the ``bad_image_policy``: ``"error"`` stops with the file's name;
``"skip"`` warns once per file, returns the next readable image in its place and counts it (see
:class:`ImageDataset` for the contract that carries the count out of DataLoader worker processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch.utils.data
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGE_POLICIES: tuple[str, ...] = ("skip", "error")
# Under ``skip``, how many consecutive candidates (the requested index, then the next ones) are tried
# before the dataset is declared broken.
MAX_SUBSTITUTE_TRIES = 64
UNLABELLED = -1

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class BrokenImageError(ValueError):
    """An image file (or a folder of them) could not be read, and the policy says not to skip it."""


class DatasetError(ValueError):
    """A dataset path that cannot be used as given (a single image, a binary list file, a wrong layout)."""


class UnsupportedImageError(ValueError):
    """An image that decodes but whose pixel values have no 8-bit meaning we could infer."""


def _check_policy(policy: str) -> None:
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(
            f"bad_image_policy={policy!r} is not one of {list(BAD_IMAGE_POLICIES)}; use 'skip' to replace "
            "unreadable images (and count them) or 'error' to stop at the first one"
        )


def is_image_file(name: str | os.PathLike) -> bool:
    """True when ``name`` ends with one of :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return str(name).lower().endswith(IMG_EXTENSIONS)


# --------------------------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even if someone set ``ImageFile.LOAD_TRUNCATED_IMAGES = True``.

    The flag is only touched (and restored) when it is set, so the usual case writes nothing.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if not previous:
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _scaled_grey(img: Image.Image) -> Image.Image:
    """8-bit RGB from a 16-bit, 32-bit integer or float greyscale image (see :func:`to_rgb`)."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        low, high, scale, kind = 0.0, 1.0, 255.0, "floating-point"
    else:
        low, high, scale, kind = 0.0, 65535.0, 1.0 / 257.0, "16-bit" if img.mode in _SIXTEEN_BIT_MODES else "32-bit"
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    if not (finite.all() and low <= lo and hi <= high):
        bad = int(values.size - finite.sum())
        found = (f"{bad} of {values.size} pixels NaN or infinite" + (f", the others in [{lo:g}, {hi:g}]"
                 if finite.any() else "") if bad else f"values in [{lo:g}, {hi:g}]")
        raise UnsupportedImageError(
            f"{kind} greyscale image (mode {img.mode}) with {found}: only [{low:g}, {high:g}] "
            "has a known 8-bit meaning (floats: 0..1; integers: 16-bit 0..65535). Convert such images to 8- or "
            "16-bit, or to floats in 0..1 without NaN, before training."
        )
    return Image.fromarray(np.rint(values * scale).astype(np.uint8)).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit ``RGB``.

    Alpha is dropped (as torchvision's loader does); palette images with transparency go through RGBA so
    PIL does not warn. Greyscale beyond 8 bits is scaled instead of PIL's clipping at 255 (which turns a 16-bit
    image white and a float image black): 16-bit (``I;16*``) and 32-bit integers (``I``) as ``v / 257``
    (65535 -> 255), floats (``F``) as ``v * 255`` (1.0 -> 255); a 32-bit image with values above 65535 or a float
    image outside [0, 1] raises :class:`UnsupportedImageError` (a broken file under the policy) rather than being
    guessed at. CMYK, LA, L, 1, P, YCbCr: PIL.
    """
    if img.mode == "RGB":
        return img
    if img.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return _scaled_grey(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: str | IO[bytes]) -> Image.Image:
    """Open, fully decode and convert one image file (a path, or an open binary file) to RGB. Raises whatever PIL
    raises for broken files."""
    opened = open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)
    with _strict_truncation(), opened as f:  # closing f, not the image, keeps its pixels usable
        img = Image.open(f)
        img.load()
        return to_rgb(img)


# --------------------------------------------------------------------------------------------- dataset


class ImageDataset(torch.utils.data.Dataset):
    """A list of ``(file, label)`` samples decoded to RGB PIL images, with a policy for broken files.

    ``dataset[i]`` returns ``(transform(img), label)``, or ``(img, label)`` without a transform, where
    ``img`` is an RGB :class:`PIL.Image.Image` and ``label`` an int (``-1`` when unlabelled).

    Broken files (unreadable, truncated, not an image) under ``bad_image_policy``:

    * ``"error"``: raise :class:`BrokenImageError` naming the file.
    * ``"skip"``: log a warning once per file per process and return, in its place, the first readable
      sample among ``i+1, i+2, ...`` (modulo ``len``; up to :data:`MAX_SUBSTITUTE_TRIES` candidates, then
      :class:`BrokenImageError`). Broken files are remembered, so none is decoded or warned about twice.

    Counting broken files. ``broken_count`` is the number of distinct broken files *this process* has met
    (exact with ``num_workers=0``). DataLoader workers are separate processes with their own copies, so
    with ``return_broken_flag=True`` every sample is a triple ``(image, label, substituted)``, where
    ``substituted`` is ``1`` when the requested file was broken and a substitute was returned, else ``0``.
    The default collate turns it into a ``LongTensor[B]``; the consumer sums it (and ``all_reduce_sum``
    over ranks): the total is the number of substituted samples; over one pass in which every index is
    requested once, it is exactly the number of broken files in the dataset.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        bad_image_policy: str = "skip",
        return_broken_flag: bool = False,
        root: str = "",
    ) -> None:
        _check_policy(bad_image_policy)
        if not samples:
            raise ValueError(f"ImageDataset needs at least one sample (root={root!r})")
        self.samples = list(samples)
        self.classes = list(classes or [])
        self.transform = transform
        self.bad_image_policy = bad_image_policy
        self.return_broken_flag = return_broken_flag
        self.root = root
        self._broken_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """All labels in sample order (``-1`` when unlabelled), as torchvision's ``ImageFolder.targets``."""
        return [label for _, label in self.samples]

    @property
    def broken_count(self) -> int:
        """Distinct broken files met so far in this process (see the class docstring for workers)."""
        return len(self._broken_paths)

    def __getitem__(self, index: int) -> tuple[Any, int] | tuple[Any, int, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        img, label, substituted = self._load_with_policy(index)
        if self.transform is not None:
            img = self.transform(img)
        if self.return_broken_flag:
            return img, label, int(substituted)
        return img, label

    def _sample(self, index: int) -> tuple[str, int]:
        """The name (a file path here) and label of sample ``index``."""
        return self.samples[index]

    def _read(self, index: int, path: str) -> str | IO[bytes]:
        """What :func:`load_rgb` decodes for sample ``index``: its file (shards: its bytes, integrity-checked)."""
        return path

    def _load_with_policy(self, index: int) -> tuple[Image.Image, int, bool]:
        """Decode sample ``index`` or, under ``skip``, the first readable one after it."""
        n = len(self)
        for attempt in range(min(n, MAX_SUBSTITUTE_TRIES)):
            path, label = self._sample((index + attempt) % n)
            if path in self._broken_paths:
                continue
            source = self._read((index + attempt) % n, path)  # not under the policy: shards raise ShardError here
            try:
                return load_rgb(source), label, attempt > 0
            except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
                if self.bad_image_policy == "error":
                    raise BrokenImageError(
                        f"cannot decode image {path!r} (dataset index {(index + attempt) % n}): "
                        f"{type(err).__name__}: {err}. Fix or remove the file, or set "
                        "train.bad_image_policy=skip to replace unreadable images and count them."
                    ) from err
                self._broken_paths.add(path)
                logger.warning(
                    "Unreadable image %s (%s: %s); using the next readable image instead "
                    "(bad_image_policy=skip).",
                    path,
                    type(err).__name__,
                    err,
                )
        first = self._sample(index)[0]
        raise BrokenImageError(
            f"{min(n, MAX_SUBSTITUTE_TRIES)} consecutive images starting at index {index} ({first!r}) are "
            f"all unreadable; the dataset at {self.root or first!r} looks broken: check the files (e.g. open "
            "them with PIL) or point train.dataset_path at a readable copy."
        )

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return (
            f"ImageDataset({len(self)} images, {kind}, root={self.root!r}, policy={self.bad_image_policy!r})"
        )


# --------------------------------------------------------------------------------------------- discovery


def _walk_images(root: Path, policy: str = "skip") -> tuple[list[tuple[str, ...]], list[str]]:
    """Relative path parts of every non-hidden image file under ``root`` (sorted), and a few non-images.

    Follows symlinked folders (datasets are often assembled from links) but never visits one twice. A folder
    that cannot be listed (permissions, I/O error) is handled like a broken image: under ``policy="error"``
    :class:`BrokenImageError` names it; under ``"skip"`` it is left out with one warning that counts them all.
    """
    images: list[tuple[str, ...]] = []
    others: list[str] = []
    seen: set[str] = set()
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if is_image_file(name):
                images.append((*rel, name))
            elif len(others) < 3:
                others.append(os.path.join(*rel, name))
    _report_unreadable_folders(root, unreadable, policy)
    images.sort()
    return images, others


def _report_unreadable_folders(root: Path, errors: list[OSError], policy: str) -> None:
    if not errors:
        return
    names = [f"{e.filename} ({e.strerror})" for e in errors]
    if policy == "error":
        raise BrokenImageError(
            f"cannot read {len(errors)} folder(s) under {str(root)!r}: {names[:5]}. Fix their permissions, or set "
            "bad_image_policy=skip (train.bad_image_policy / --bad-image-policy) to leave them out."
        )
    logger.warning("%d folder(s) under %s cannot be read and are left out (bad_image_policy=skip): %s",
                   len(errors), root, names[:5])


def _no_images_error(where: str, others: list[str]) -> FileNotFoundError:
    found = f" (it holds other files, e.g. {others})" if others else ""
    return FileNotFoundError(
        f"no image files found in {where}{found}. Recognised extensions (any case): "
        f"{', '.join(IMG_EXTENSIONS)}. Point train.dataset_path at a folder of images, a class-folder tree "
        "or a text file listing image paths."
    )


def _scan_folder(root: Path, labelled: bool | None, policy: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and classes for a folder; see :func:`build_image_dataset` for the layout rule."""
    images, others = _walk_images(root, policy)
    if not images:
        raise _no_images_error(f"folder {str(root)!r}", others)
    at_root = [parts[0] for parts in images if len(parts) == 1]
    if labelled is None:
        labelled = all(len(parts) == 2 for parts in images)
        layout = "class-folder tree" if labelled else "unlabelled folder"
        logger.info(
            "%s: %d images, read as a %s (pass labelled=True/False to override).", root, len(images), layout
        )
    elif labelled and at_root:
        raise DatasetError(
            f"labelled=True but {str(root)!r} holds images directly (e.g. {at_root[:3]}); a class-folder "
            "tree keeps every image inside a class sub-folder; move them into one, or use labelled=False."
        )
    if not labelled:
        return [(str(root.joinpath(*parts)), UNLABELLED) for parts in images], []
    classes = sorted({parts[0] for parts in images})
    index = {name: i for i, name in enumerate(classes)}
    return [(str(root.joinpath(*parts)), index[parts[0]]) for parts in images], classes


def _read_list_file(list_file: Path) -> list[tuple[str, int]]:
    """Samples for a text file naming one image per line (relative to the list file's folder)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{str(list_file)!r} is neither a folder, an image nor a UTF-8 text list of image paths ({err}); "
            "point train.dataset_path at a folder of images or a text file with one image path per line."
        ) from err
    base = list_file.parent
    paths: list[str] = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry).expanduser()
            paths.append(os.path.normpath(path if path.is_absolute() else base / path))
    if not paths:
        raise _no_images_error(f"list file {str(list_file)!r} (it lists no paths)", [])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} entries in list file {str(list_file)!r} are not files, e.g. "
            f"{missing[:5]}. Relative entries are resolved against {str(base)!r}; fix or remove those lines."
        )
    return [(p, UNLABELLED) for p in paths]


def build_image_dataset(
    path: str | os.PathLike,
    transform: Callable[[Image.Image], Any] | None = None,
    bad_image_policy: str = "skip",
    labelled: bool | None = None,
    return_broken_flag: bool = False,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from a folder or a list file.

    Image files are those ending in :data:`IMG_EXTENSIONS` (any case); hidden files and folders (name
    starting with ``.``) are ignored; symlinked folders are followed.

    **Folder** — the layout rule (``labelled=None``, automatic):

    * if *every* image sits exactly one level below ``path`` (``path/<folder>/<image>``), it is a
      class-folder tree: ``classes`` = the sorted names of the folders that hold images, label = index
      in ``classes``; folders without images are not classes;
    * otherwise — any image directly in ``path``, or any image deeper than one level — it is unlabelled:
      every image under ``path`` at any depth, label ``-1``, ``classes == []``.

    ``labelled=True`` forces a class-folder tree with classes = the first-level folders and images at any
    depth below them (``ValueError`` if ``path`` holds images directly); ``labelled=False`` forces
    unlabelled. Samples are sorted by their path relative to ``path`` (folder by folder), so the order
    is the same on every machine.

    **Shards** — a brace pattern, a ``.tar``, a folder of ``.tar`` files or with a shard ``index.json``, a ``.json``
    shard list, or an ``http(s)://`` URL: a :class:`~ssl_distill.data.shards.ShardDataset` (``ssl-distill shards``
    packs a folder into them; see :mod:`ssl_distill.data.shard_index`).

    **List file** — any other file: UTF-8 text, one image path per line; relative paths are resolved
    against the list file's folder; blank lines and lines starting with ``#`` are ignored; labels ``-1``;
    the order is the file's order.

    Raises ``FileNotFoundError`` when ``path`` does not exist, holds no images, or a list entry is not a
    file; ``ValueError`` for an unknown ``bad_image_policy``, an image file given as ``path``, or a
    non-text list file. ``transform``, ``bad_image_policy`` and ``return_broken_flag``: see
    :class:`ImageDataset`.
    """
    _check_policy(bad_image_policy)
    from .shard_index import is_shard_spec  # shard_index builds on this module

    if is_shard_spec(path):
        from .shards import build_shard_dataset

        return build_shard_dataset(path, transform, bad_image_policy, labelled, return_broken_flag)
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"dataset path {str(root)!r} does not exist; set train.dataset_path to a folder of images, a "
            "class-folder tree or a text file listing image paths."
        )
    if root.is_dir():
        samples, classes = _scan_folder(root, labelled, bad_image_policy)
    elif is_image_file(root.name):
        raise DatasetError(
            f"dataset path {str(root)!r} is a single image; pass the folder that holds the images, or a text "
            "file listing image paths."
        )
    else:
        if labelled:
            raise DatasetError(f"labelled=True needs a class-folder tree, but {str(root)!r} is a list file")
        samples, classes = _read_list_file(root), []
    return ImageDataset(
        samples,
        classes=classes,
        transform=transform,
        bad_image_policy=bad_image_policy,
        return_broken_flag=return_broken_flag,
        root=str(root),
    )
