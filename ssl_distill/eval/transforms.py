"""Evaluation transforms, as in DINO/DINOv2's linear and k-NN evaluation (Caron et al. 2021, Oquab et al. 2023).

* evaluation: resize the shorter side to ``S * 256 / 224`` (bicubic), centre-crop ``S``, ImageNet normalisation;
* linear-probe training: ``RandomResizedCrop(S)`` (bicubic) + horizontal flip, ImageNet normalisation.

Both map an RGB PIL image to a float tensor ``(3, S, S)``.
"""

from __future__ import annotations

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize() -> list:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def make_eval_transform(image_size: int = 224) -> transforms.Compose:
    """Resize (shorter side ``round(S * 256 / 224)``, bicubic) -> centre-crop ``S`` -> tensor -> normalise."""
    if image_size < 1:
        raise ValueError(f"image size must be >= 1, got {image_size}")
    resize = int(round(image_size * 256 / 224))
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            *_normalize(),
        ]
    )


def make_train_transform(image_size: int = 224) -> transforms.Compose:
    """RandomResizedCrop ``S`` (bicubic) -> random horizontal flip -> tensor -> normalise (linear-probe training)."""
    if image_size < 1:
        raise ValueError(f"image size must be >= 1, got {image_size}")
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            *_normalize(),
        ]
    )
