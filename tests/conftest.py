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
