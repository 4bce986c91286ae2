"""Block-wise patch masking for masked image modelling (BEiT, Bao et al. 2022; iBOT, Zhou et al. 2022).

A mask is built from random rectangles ("blocks") of patches with a random area and a log-uniform aspect ratio,
added until the requested number of patches is masked. Semantics follow dinov2's ``data/masking.py``.
"""

from __future__ import annotations

import math
import numbers
import random

import numpy as np
import torch

__all__ = ["MaskingGenerator", "torch_seeded_random"]


def torch_seeded_random() -> random.Random:
    """A fresh ``random.Random`` seeded with 63 bits drawn from torch's global RNG.

    This ties Python-side randomness to ``torch.manual_seed`` (and to the per-worker torch seeds that
    ``DataLoader`` sets), without touching the module-level ``random`` state.
    """
    return random.Random(int(torch.randint(0, 2**63 - 1, (1,)).item()))


def _check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


class MaskingGenerator:
    """iBOT / BEiT block mask generator over a ``(height, width)`` grid of patches.

    ``generator(n)`` returns a ``bool`` numpy array of shape ``(height, width)`` with at most ``n`` ``True``
    entries (usually exactly ``n``; fewer when 10 consecutive block proposals fail to fit). Each block covers
    a target area ``U(min_num_patches, max)`` patches, where ``max = min(remaining, max_num_patches)``, with
    aspect ratio (height / width) log-uniform in ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``);
    a block adds at most ``max`` new patches and is strictly narrower/shorter than the grid.

    Args:
        input_size: grid side (int) or ``(height, width)`` in patches.
        max_num_patches: cap on the new patches one block may add (default: the whole grid). The reference
            calls this ``num_masking_patches``; floats are accepted as in dinov2's training script.
        min_num_patches: lower end of a block's target area.
        min_aspect, max_aspect: aspect-ratio range of a block.
        rng: ``random.Random`` to draw from. Default ``None``: every call draws a fresh generator seeded from
            torch's global RNG (:func:`torch_seeded_random`), so ``torch.manual_seed`` makes masks reproducible
            and DataLoader workers, which reseed torch per worker, draw different masks. An explicit ``rng`` is
            copied into each worker with the same state, so workers would repeat each other's masks.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        if len(input_size) != 2:
            raise ValueError(f"input_size must be an int or a (height, width) pair, got {input_size!r}.")
        self.height = _check_positive_int("input_size height", input_size[0])
        self.width = _check_positive_int("input_size width", input_size[1])
        self.num_patches = self.height * self.width
        self.min_num_patches = _check_positive_int("min_num_patches", min_num_patches)
        if max_num_patches is None:
            max_num_patches = self.num_patches
        if not isinstance(max_num_patches, numbers.Real) or isinstance(max_num_patches, bool) or max_num_patches <= 0:
            raise ValueError(f"max_num_patches must be a positive number or None, got {max_num_patches!r}.")
        self.max_num_patches = max_num_patches
        if not isinstance(min_aspect, numbers.Real) or min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0 (height / width of a block), got {min_aspect!r}.")
        max_aspect = max_aspect or 1 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect}).")
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random or None, got {type(rng).__name__}.")
        self.rng = rng

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({self.min_aspect:.3f}, {self.max_aspect:.3f}))"
        )

    def get_shape(self) -> tuple[int, int]:
        """The mask shape ``(height, width)``."""
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """Try up to 10 block proposals; fill the first that adds 1..max_mask_patches patches. Returns the count."""
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                delta = h * w - int(block.sum())
                if 0 < delta <= max_mask_patches:
                    block[...] = True
                    return delta
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """A ``bool`` array ``(height, width)`` with at most ``num_masking_patches`` masked patches.

        ``rng`` overrides the generator's own randomness for this call (per-sample seeded masks).
        """
        rng = rng if rng is not None else self.rng if self.rng is not None else torch_seeded_random()
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return mask

