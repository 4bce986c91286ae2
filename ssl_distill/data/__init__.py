"""Data: datasets, multi-crop augmentation, block masking, collate, samplers."""

from .augment import MultiCropAugmentation
from .collate import TrainingCollator, collate_data_and_cast
from .datasets import IMG_EXTENSIONS, BrokenImageError, DatasetError, ImageDataset, build_image_dataset
from .masking import MaskingGenerator
from .sample_images import SAMPLE_PHOTO_NAMES, sample_photos
from .samplers import InfiniteSampler

__all__ = [
    "IMG_EXTENSIONS",
    "BrokenImageError",
    "DatasetError",
    "ImageDataset",
    "InfiniteSampler",
    "build_image_dataset",
    "SAMPLE_PHOTO_NAMES",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "TrainingCollator",
    "collate_data_and_cast",
    "sample_photos",
]
