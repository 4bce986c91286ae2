"""Shared fixtures and helpers for the tests/test_eval_*.py files (import them: ``from eval_fixtures import ...``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from ssl_distill.data.digits import write_digits_folders
from ssl_distill.models import VisionTransformer, build_backbone


def make_digits_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """scikit-learn digits as ``train/<d>/*.png`` (12 per class) and ``val/<d>/*.png`` (6 per class), 32 px.

    Wrap it in a module's own fixture: ``digits_dirs = pytest.fixture(scope="module")(...)``, see the tests.
    """
    return write_digits_folders(tmp_path_factory.mktemp("digits"), 12, 6, size=32)


def tiny_backbone(seed: int = 0, **kwargs) -> VisionTransformer:
    """A 2-block ViT-Ti/8 for 32 px images (random init, seeded), in eval mode."""
    torch.manual_seed(seed)
    args = {"patch_size": 8, "img_size": 32, "depth": 2, "init_values": 1.0, **kwargs}
    return build_backbone("vit_tiny", **args).eval()


class TensorImages(Dataset):
    """``(image (3, 32, 32), label)`` pairs from fixed random tensors (no decoding: fast feature tests)."""

    def __init__(self, n: int, num_classes: int = 3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=gen)
        self.labels = torch.arange(n) % num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
