"""scikit-learn's handwritten digits as a class-folder tree of PNG files: real labelled images for tests and demos.

``sklearn.datasets.load_digits`` ships 1797 greyscale 8x8 images of the digits 0-9 (UCI optical recognition of
handwritten digits, Alpaydin & Kaynak 1998). :func:`write_digits_folders` upscales them and writes a
``train/<digit>/*.png`` and ``val/<digit>/*.png`` split, the layout :func:`build_image_dataset` reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

N_CLASSES = 10


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the digits images come with scikit-learn; install it (pip install scikit-learn, or the [demo] extra)"
        ) from err
    data = load_digits()
    return np.asarray(data.images), np.asarray(data.target)


def _to_png(image: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (values 0..16) -> an RGB ``size x size`` image, bicubic upscaling, white digit on black."""
    grey = np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def write_digits_folders(
    root: str | os.PathLike, n_train_per_class: int, n_val_per_class: int, size: int = 32
) -> tuple[Path, Path]:
    """Write ``root/train/<d>/<i>.png`` and ``root/val/<d>/<i>.png`` for the ten digit classes ``d``.

    Deterministic: per class, the first ``n_train_per_class`` images in scikit-learn's order go to train and the
    next ``n_val_per_class`` to val (the two never overlap). Each class has at least 174 images, so
    ``n_train_per_class + n_val_per_class`` must be <= 174. Returns ``(train_dir, val_dir)``.
    """
    if n_train_per_class < 1 or n_val_per_class < 1:
        raise ValueError("n_train_per_class and n_val_per_class must be >= 1")
    if size < 8:
        raise ValueError(f"size={size} is smaller than the 8 px originals; use size >= 8")
    images, targets = _load_digits()
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    for digit in range(N_CLASSES):
        idx = np.flatnonzero(targets == digit)
        need = n_train_per_class + n_val_per_class
        if need > len(idx):
            raise ValueError(f"digit {digit} has {len(idx)} images; asked for {need} (train + val per class)")
        for split_dir, chosen in ((train_dir, idx[:n_train_per_class]), (val_dir, idx[n_train_per_class:need])):
            class_dir = split_dir / str(digit)
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                _to_png(images[i], size).save(class_dir / f"{int(i):04d}.png")
    return train_dir, val_dir
