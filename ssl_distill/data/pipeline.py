"""The training input pipeline: seeded multi-crop samples -> :class:`~ssl_distill.data.collate.TrainingCollator`.

Every random draw of a sample (crops, colour, blur, masks) is a pure function of ``(seed, global position)``, where
the global position comes from :class:`~ssl_distill.data.samplers.InfiniteSampler` (``with_positions=True``). The
batches are therefore identical whatever the number of ranks or DataLoader workers, and a resumed run sees exactly
the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import torch

from .augment import MultiCropAugmentation
from .datasets import ImageDataset
from .samplers import derive_seed


class SeededMultiCropDataset(torch.utils.data.Dataset):
    """Wrap an :class:`ImageDataset` (``return_broken_flag=True``, no transform) with seeded multi-crop augmentation.

    Indexed by ``(global_position, index)`` pairs; returns ``{"crops": augmentation dict, "position": int,
    "broken": 0 | 1}``. The global torch RNG is forked around each sample, so the caller's RNG is untouched.
    """

    def __init__(self, dataset: ImageDataset, augmentation: MultiCropAugmentation, seed: int) -> None:
        if not getattr(dataset, "return_broken_flag", False):
            raise ValueError("SeededMultiCropDataset needs an ImageDataset built with return_broken_flag=True.")
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "sample", position) % (2**63))
            image, _, substituted = self.dataset[index]
            crops = self.augmentation(image)
        return {"crops": crops, "position": int(position), "broken": int(substituted)}
