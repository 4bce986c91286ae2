"""Real photographs bundled with scikit-learn and scikit-image, for tests and demos (no download needed).

Needs the ``demo`` extra: ``pip install 'ssl-distill[demo]'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["SAMPLE_PHOTO_NAMES", "sample_photos"]

_SKLEARN_PHOTOS = ("china", "flower")  # sklearn.datasets.load_sample_images(), 640 x 427 RGB
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")  # skimage.data, bundled; camera is gray
SAMPLE_PHOTO_NAMES: tuple[str, ...] = _SKLEARN_PHOTOS + _SKIMAGE_PHOTOS

_INSTALL_HINT = "sample photos need scikit-learn and scikit-image; install them with pip install 'ssl-distill[demo]'"


def _sklearn_photos() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    bunch = load_sample_images()
    names = [fn.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for fn in bunch.filenames]
    return dict(zip(names, bunch.images))


def _skimage_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return getattr(skimage.data, name)()


def sample_photos(names: Sequence[str] | None = None) -> list[Image.Image]:
    """Load real photographs as PIL images (RGB, except ``camera`` which is grayscale ``"L"``).

    Args:
        names: subset of :data:`SAMPLE_PHOTO_NAMES` (default: all, in that order).

    Returns:
        one ``PIL.Image.Image`` per name; ``image.info["name"]`` holds its name.
    """
    names = SAMPLE_PHOTO_NAMES if names is None else tuple(names)
    unknown = [n for n in names if n not in SAMPLE_PHOTO_NAMES]
    if unknown:
        raise ValueError(f"unknown sample photo(s) {unknown}; choose from {list(SAMPLE_PHOTO_NAMES)}.")
    sk = _sklearn_photos() if any(n in _SKLEARN_PHOTOS for n in names) else {}
    photos = []
    for name in names:
        image = Image.fromarray(sk[name] if name in _SKLEARN_PHOTOS else _skimage_photo(name))
        image.info["name"] = name
        photos.append(image)
    return photos
