"""Data: datasets, multi-crop augmentation, block masking, collate, samplers."""

from .augment import MultiCropAugmentation
from .collate import MaskingCollator, collate_data_and_cast
from .masking import BlockMaskGenerator, MaskingGenerator
from .sample_images import SAMPLE_PHOTO_NAMES, sample_photos

__all__ = [
    "SAMPLE_PHOTO_NAMES",
    "BlockMaskGenerator",
    "MaskingCollator",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "collate_data_and_cast",
    "sample_photos",
]
