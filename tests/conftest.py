"""Shared pytest fixtures. Keep this file small: feature-specific helpers live in their test modules."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_distill.data.sample_images import sample_photos


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs (scikit-learn + scikit-image bundles): RGB of several sizes and one grayscale."""
    return sample_photos()


@pytest.fixture
def seed_all() -> Callable[[int], None]:
    """``seed_all(s)`` seeds torch, numpy and Python's ``random`` for a reproducible test."""

    def _seed(seed: int = 0) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    return _seed


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory, photos) -> str:
    """A flat folder of 48 real JPEG photos (rotated/cropped variants of the bundled ones), for training runs."""
    root = tmp_path_factory.mktemp("photo_folder")
    for i in range(48):
        img = photos[i % len(photos)].convert("RGB")
        w, h = img.size
        box = (i * 7 % (w // 3), i * 5 % (h // 3), w - i * 3 % (w // 3), h - i * 11 % (h // 3))
        img.crop(box).rotate(i * 7.5).resize((64, 64)).save(root / f"photo_{i:03d}.jpg", quality=90)
    return str(root)
