"""Labelled train/val class-folder datasets for the probes, checked for the mistakes users make."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssl_distill.data.datasets import ImageDataset, build_image_dataset
from ssl_distill.data.shard_index import is_shard_spec

logger = logging.getLogger(__name__)


class EvalInputError(ValueError):
    """A user mistake in an evaluation's inputs (datasets, weights, options); one line names it and the fix."""


def _open(path: str, role: str, transform: Callable | None, policy: str) -> ImageDataset:
    root = Path(path).expanduser()
    shards = is_shard_spec(path)
    if not shards and not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise EvalInputError(
            f"--{role}-dataset '{path}' {what}; pass a class-folder tree (<root>/<class>/<image>), one sub-folder "
            "per class, or the shards `ssl-distill shards` packed from one."
        )
    try:
        ds = build_image_dataset(path if shards else root, transform=transform, bad_image_policy=policy,
                                 labelled=True)
    except (FileNotFoundError, ValueError) as err:
        raise EvalInputError(f"--{role}-dataset '{path}': {err}") from None
    if len(ds.classes) < 2:
        raise EvalInputError(
            f"--{role}-dataset '{path}' has {len(ds.classes)} class ({ds.classes}); classification needs at least "
            "2 class sub-folders (<root>/<class>/<image>). Is the path one level too deep?"
        )
    return ds


def load_labelled_datasets(
    train_path: str,
    val_path: str,
    train_transform: Callable[[Any], Any] | None,
    val_transform: Callable[[Any], Any] | None,
    bad_image_policy: str = "error",
) -> tuple[ImageDataset, ImageDataset]:
    """The train and val class-folder trees; val labels are re-indexed to the train class list.

    Raises :class:`EvalInputError` for a missing path, fewer than two classes or val classes absent from train.
    """
    train = _open(train_path, "train", train_transform, bad_image_policy)
    val = _open(val_path, "val", val_transform, bad_image_policy)
    empty_train = _empty_class_folders(train)
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        empty = [c for c in unknown if c in empty_train]
        why = (f" (in --train-dataset these folders hold no images: {empty[:10]}; add training images to them)"
               if empty else "")
        raise EvalInputError(
            f"--val-dataset '{val_path}' has classes that are not in --train-dataset '{train_path}': {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}{why}. Both trees must use the same class folder names."
        )
    if empty_train:
        logger.warning("--train-dataset '%s': class folder(s) %s hold no images; they are not classes of this "
                       "evaluation", train_path, empty_train[:10])
    index = {name: i for i, name in enumerate(train.classes)}
    val.samples = [(path, index[val.classes[label]]) for path, label in val.samples]
    _report_untested(val, train.classes, val_path)
    val.classes = list(train.classes)
    return train, val


def _empty_class_folders(ds: ImageDataset) -> list[str]:
    """Sub-folders of a class-folder tree's root that hold no images (so they are no class of ``ds``); shards have
    none (their classes are those the packer found images of)."""
    root = Path(ds.root)
    if not root.is_dir() or is_shard_spec(ds.root):
        return []
    return sorted(d.name for d in root.iterdir()
                  if not d.name.startswith(".") and d.is_dir() and d.name not in set(ds.classes))


def untested_classes(train_classes: list[str], val: ImageDataset) -> list[str]:
    """The train classes without a single val image (after :func:`load_labelled_datasets`): the accuracy says
    nothing about them."""
    tested = {label for _, label in val.samples}
    return [name for i, name in enumerate(train_classes) if i not in tested]


def _report_untested(val: ImageDataset, train_classes: list[str], val_path: str) -> None:
    """One warning when a val class folder holds no images: the accuracy silently leaves that class out."""
    empty = [name for name in _empty_class_folders(val) if name in train_classes]
    untested = untested_classes(train_classes, val)
    if empty:
        logger.warning(
            "--val-dataset '%s': class folder(s) %s hold no images, so the accuracy leaves them out (it is over "
            "the %d of %d classes that have val images; results JSON: untested_classes). Add val images to them, or "
            "remove them from both trees.", val_path, empty[:10], len(train_classes) - len(untested),
            len(train_classes))
    elif untested:
        logger.info("--val-dataset '%s' covers %d of the %d train classes; not tested: %s", val_path,
                    len(train_classes) - len(untested), len(train_classes), untested[:10])
