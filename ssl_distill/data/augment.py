"""Multi-crop augmentation (DINO, Caron et al. 2021; DINOv2, Oquab et al. 2023).

Each image becomes two large "global" crops (seen by the student and the EMA teacher) and ``n`` small "local"
crops (student only). The recipe is BYOL's (Grill et al. 2020): random resized crop + flip, colour jitter,
grayscale, Gaussian blur, solarisation, ImageNet normalisation.

The pipeline is ``torchvision.transforms.v2`` (parameters, probabilities and random draws are torchvision's) on
``uint8`` ``(3, H, W)`` tensors until the final normalisation; crop, colour jitter, blur and normalisation use the
faster kernels of :mod:`ssl_distill.data.fast_transforms` (OpenCV, channels-last memory, one fused multiply-add).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from ssl_distill.data.fast_transforms import (
    ColorJitter,
    GaussianBlur,
    RandomResizedCrop,
    RandomRotation,
    ToFloatNormalize,
    to_rgb_uint8,
)

__all__ = [
    "ColorJitter",
    "GaussianBlur",
    "MultiCropAugmentation",
    "RandomResizedCrop",
    "RandomRotation",
    "ToFloatNormalize",
    "to_rgb_uint8",
]

_MIN_CROP_SIZE = 5  # the 9x9 blur reflect-pads 4 pixels on each side, which needs at least 5 pixels


def _check_scale(name: str, scale: Any) -> tuple[float, float]:
    ok = (
        isinstance(scale, (tuple, list))
        and len(scale) == 2
        and all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in scale)
    )
    if not ok or not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(
            f"{name} must be a pair (min, max) with 0 < min <= max <= 1 (fractions of the image area), got {scale!r}."
        )
    return float(scale[0]), float(scale[1])


def _check_real(name: str, value: Any, low: float, high: float, kind: str) -> float:
    """``value`` as a float if it is a real number (not a bool) in ``[low, high]``; else one error naming ``kind``."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}.")
    return float(value)


def _check_size(name: str, size: Any) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < _MIN_CROP_SIZE:
        raise ValueError(
            f"{name} must be an int >= {_MIN_CROP_SIZE} (pixels; the 9x9 Gaussian blur needs it), got {size!r}."
        )
    return size


class MultiCropAugmentation:
    """DINOv2 multi-crop augmentation: 2 global crops + ``local_crops_number`` local crops per image.

    Per crop: ``RandomResizedCrop`` (bicubic, antialias) [+ a random rotation by up to ``rotation_degrees``, off by
    default] + horizontal flip (p=0.5); ``ColorJitter(0.4, 0.4, 0.2,
    0.1)`` with p=0.8; grayscale with p=0.2; Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0)) with probability
    **1.0 for global crop 1, 0.1 for global crop 2 and 0.5 for local crops**; solarisation (threshold 128 on uint8)
    with p=0.2 on global crop 2 only; then ``ToDtype(float32, scale=True)`` and ImageNet normalisation (fused,
    :class:`ToFloatNormalize`). Crop, colour jitter, blur and normalisation are this module's faster subclasses of
    the torchvision transforms (see the module docstring); the random draws are torchvision's.

    Difference to the reference: dinov2's ``GaussianBlur(p=...)`` subclasses ``RandomApply`` with
    ``keep_p = 1 - p``, so its blur probabilities are inverted — it never blurs global crop 1, blurs global crop 2
    with probability 0.9, and local crops with 0.5. We apply the probabilities as the DINOv2 / BYOL papers state
    them (1.0 / 0.1 / 0.5). The values are class attributes (``global1_blur_p``, ``global2_blur_p``,
    ``local_blur_p``, ``global2_solarize_p``, ...); a subclass can override them, and the probabilities named in
    :attr:`PROBABILITIES` can also be given as keyword arguments (``crops.*_p`` in the config: images such as
    digits or text want no flip, and clean greyscale ones train better without blur and solarisation).

    Randomness comes from torch's global RNG: ``torch.manual_seed(s)`` before a call makes it reproducible
    (DataLoader workers reseed torch per worker, so workers draw different crops).

    The per-crop pipelines are public: ``global_transfo1``, ``global_transfo2`` and ``local_transfo`` map a
    ``uint8`` ``(3, H, W)`` tensor to a normalised crop. Every random photometric step is a
    ``v2.RandomApply([op], p)``, so tests can swap ``op`` for a spy.

    Call with a PIL image (any mode; converted to RGB) or a ``uint8`` tensor ``(C, H, W)``. Returns::

        {"global_crops": [2 x float32 (3, G, G)], "local_crops": [n x float32 (3, L, L)]}

    with ``G = global_crops_size`` and ``L = local_crops_size``; every crop is a contiguous tensor. (The reference
    also returns ``global_crops_teacher``, the same two crops, and an empty ``offsets``; nothing reads them.)
    """

    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global1_blur_p: float = 1.0
    global2_blur_p: float = 0.1
    local_blur_p: float = 0.5
    global2_solarize_p: float = 0.2
    solarize_threshold: int = 128
    rotation_degrees: float = 0.0  # 0 = no rotation (the recipe); for images without an upright (cells, aerial)
    PROBABILITIES = ("flip_p", "color_jitter_p", "grayscale_p", "global1_blur_p", "global2_blur_p", "local_blur_p",
                     "global2_solarize_p")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        rotation_degrees: float = 0.0,
        **probabilities: float,
    ) -> None:
        self.rotation_degrees = _check_real("rotation_degrees", rotation_degrees, 0.0, 180.0, "an angle")
        for name, p in probabilities.items():  # instance values shadow the class attributes
            if name not in self.PROBABILITIES:
                raise TypeError(f"unknown augmentation probability {name!r}; valid: {', '.join(self.PROBABILITIES)}")
            setattr(self, name, _check_real(name, p, 0.0, 1.0, "a probability"))
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        if not isinstance(local_crops_number, int) or isinstance(local_crops_number, bool) or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an int >= 0, got {local_crops_number!r}.")
        self.local_crops_number = local_crops_number
        self.global_crops_size = _check_size("global_crops_size", global_crops_size)
        self.local_crops_size = _check_size("local_crops_size", local_crops_size)
        if local_crops_size > global_crops_size:
            raise ValueError(
                f"local_crops_size ({local_crops_size}) must be <= global_crops_size ({global_crops_size})."
            )

        self.global_transfo1 = self._pipeline(global_crops_size, self.global_crops_scale, self.global1_blur_p)
        self.global_transfo2 = self._pipeline(
            global_crops_size, self.global_crops_scale, self.global2_blur_p, self.global2_solarize_p
        )
        self.local_transfo = self._pipeline(local_crops_size, self.local_crops_scale, self.local_blur_p)

    def _pipeline(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0) -> v2.Compose:
        """One crop's pipeline: uint8 ``(3, H, W)`` -> float32 normalised ``(3, size, size)``."""
        steps: list[Any] = [
            RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        ]
        if self.rotation_degrees > 0:  # after the crop: the rotation's cost does not grow with the source image
            steps.append(RandomRotation(self.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR))
        steps += [
            v2.RandomHorizontalFlip(p=self.flip_p),
            v2.RandomApply([ColorJitter(*self.color_jitter)], p=self.color_jitter_p),
            v2.RandomGrayscale(p=self.grayscale_p),
            v2.RandomApply([GaussianBlur(self.blur_kernel_size, sigma=self.blur_sigma)], p=blur_p),
        ]
        if solarize_p > 0:
            steps.append(v2.RandomApply([v2.RandomSolarize(self.solarize_threshold, p=1.0)], p=solarize_p))
        steps.append(ToFloatNormalize(mean=self.mean, std=self.std))
        return v2.Compose(steps)

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, Any]:
        """Crop ``image`` (PIL or uint8 ``(C, H, W)``); see the class docstring for the returned dict."""
        x = to_rgb_uint8(image)
        global_crops = [self.global_transfo1(x), self.global_transfo2(x)]
        local_crops = [self.local_transfo(x) for _ in range(self.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size}, "
            f"blur_p=({self.global1_blur_p}, {self.global2_blur_p}, {self.local_blur_p}), "
            f"solarize_p=(0.0, {self.global2_solarize_p}, 0.0), rotation_degrees={self.rotation_degrees})"
        )
