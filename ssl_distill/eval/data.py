"""Labelled train/val class-folder datasets for the probes, checked for the mistakes users make."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssl_distill.data.datasets import ImageDataset, build_image_dataset


class EvalInputError(ValueError):
    """A user mistake in an evaluation's inputs (datasets, weights, options); one line names it and the fix."""


def _open(path: str, role: str, transform: Callable | None, policy: str) -> ImageDataset:
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise EvalInputError(
            f"--{role}-dataset '{path}' {what}; pass a class-folder tree (<root>/<class>/<image>), one sub-folder "
            "per class."
        )
    try:
        ds = build_image_dataset(root, transform=transform, bad_image_policy=policy, labelled=True)
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
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise EvalInputError(
            f"--val-dataset '{val_path}' has classes that are not in --train-dataset '{train_path}': {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}. Both trees must use the same class folder names."
        )
    index = {name: i for i, name in enumerate(train.classes)}
    val.samples = [(path, index[val.classes[label]]) for path, label in val.samples]
    val.classes = list(train.classes)
    return train, val
