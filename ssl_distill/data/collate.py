"""Collate multi-crop samples and iBOT masks into one batch dict (DINOv2, Oquab et al. 2023).

Semantics follow dinov2's ``data/collate.py``: crops are stacked crop-major, and the masked images draw their mask
ratios stratified over ``linspace(*mask_ratio_tuple, n_masked + 1)`` so every batch spans the whole ratio range.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .masking import MaskingGenerator, torch_seeded_random
from .samplers import derive_seed

__all__ = ["collate_data_and_cast", "MaskingCollator", "TrainingCollator"]


def _check_ratios(mask_ratio_tuple: Sequence[float], mask_probability: float) -> None:
    if len(mask_ratio_tuple) != 2 or not (0.0 <= mask_ratio_tuple[0] <= mask_ratio_tuple[1] <= 1.0):
        raise ValueError(
            f"mask_ratio_tuple must be (min, max) with 0 <= min <= max <= 1, got {tuple(mask_ratio_tuple)!r}."
        )
    if not (0.0 <= mask_probability <= 1.0):
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability!r}.")


def _resolve_tokens(n_tokens: int | None, mask_generator: MaskingGenerator | None, mask_probability: float) -> int:
    if mask_generator is None:
        if mask_probability > 0:
            raise ValueError("mask_probability > 0 needs a mask_generator (e.g. MaskingGenerator(16)).")
        if n_tokens is None:
            raise ValueError("pass mask_generator or n_tokens (the number of patch tokens per global crop).")
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}.")
        return n_tokens
    if n_tokens is None:
        return mask_generator.num_patches
    if n_tokens != mask_generator.num_patches:
        raise ValueError(
            f"n_tokens ({n_tokens}) must equal the mask generator's num_patches ({mask_generator.num_patches}); "
            "build the generator over the patch grid of the global crops."
        )
    return n_tokens


def _stack_crop_major(samples_list: Sequence[tuple[dict, Any]], key: str) -> list[torch.Tensor]:
    n_crops = len(samples_list[0][0][key])
    for aug, _ in samples_list:
        if len(aug[key]) != n_crops:
            raise ValueError(f"every sample must have the same number of {key} ({n_crops}), got {len(aug[key])}.")
    return [s[0][key][i] for i in range(n_crops) for s in samples_list]


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict, Any]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Stack crops crop-major and draw iBOT masks for the global crops (the reference's function and signature).

    A thin entry point over :class:`TrainingCollator`, the implementation training runs: the call is one global
    batch at sample positions ``0 .. B-1`` whose seed is drawn from ``rng`` (default: from torch's RNG).

    Args:
        samples_list: ``[(augmentation_dict, label), ...]`` of length ``B``, each dict from
            :class:`~ssl_distill.data.MultiCropAugmentation` (``n_g`` global and ``n_l`` local crops).
        mask_ratio_tuple: ``(min, max)`` fraction of patches to mask in a masked image.
        mask_probability: fraction of the ``n_g * B`` global crops that get a mask (``int(n_g * B * p)``).
        dtype: dtype of the returned crops.
        n_tokens: patches per global crop ``N`` (default: ``mask_generator.num_patches``).
        mask_generator: a :class:`MaskingGenerator` over the global crops' patch grid.
        rng: ``random.Random`` that seeds the draws; default a fresh one seeded from torch's RNG.

    Returns:
        ``collated_global_crops`` ``(n_g * B, C, G, G)`` — row ``i * B + b`` is crop ``i`` of sample ``b``;
        ``collated_local_crops`` ``(n_l * B, C, L, L)``, or an empty ``(0,)`` tensor when there are no local
        crops (its size cannot be known); ``collated_masks`` bool ``(n_g * B, N)``; ``mask_indices_list``
        ``(M,)`` flat indices of the masked patches; ``masks_weight`` ``(M,)`` = ``1 / masked patches of its
        image`` (sums to 1 per masked image).
    """
    if len(samples_list) == 0:
        raise ValueError("samples_list is empty; a batch needs at least one sample.")
    seed = (rng if rng is not None else torch_seeded_random()).getrandbits(63)
    collator = TrainingCollator(len(samples_list), mask_ratio_tuple, mask_probability, mask_generator, seed, dtype,
                                n_tokens=n_tokens)
    batch = collator([{"crops": crops, "position": b} for b, (crops, _) in enumerate(samples_list)])
    del batch["positions"], batch["n_broken"]  # training's keys (stochastic-depth keys, broken-image count)
    return batch


def _batch_dict(
    global_crops: torch.Tensor, local_crops: torch.Tensor, masks_list: list[torch.Tensor], dtype: torch.dtype,
) -> dict[str, Any]:
    """The batch dict from stacked crops and one flat bool mask ``(N,)`` per global crop."""
    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
    }


class MaskingCollator:
    """Picklable ``collate_fn`` for a ``DataLoader``: ``collator(samples_list)`` = :func:`collate_data_and_cast`.

    Randomness comes from torch's RNG (per call), so DataLoader workers, which torch reseeds per worker, draw
    different masks.
    """

    def __init__(
        self,
        mask_ratio_tuple: tuple[float, float],
        mask_probability: float,
        dtype: torch.dtype,
        n_tokens: int | None = None,
        mask_generator: MaskingGenerator | None = None,
    ) -> None:
        _check_ratios(mask_ratio_tuple, mask_probability)
        self.n_tokens = _resolve_tokens(n_tokens, mask_generator, mask_probability)
        self.mask_ratio_tuple = (float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]))
        self.mask_probability = float(mask_probability)
        self.dtype = dtype
        self.mask_generator = mask_generator

    def __call__(self, samples_list: Sequence[tuple[dict, Any]]) -> dict[str, Any]:
        return collate_data_and_cast(samples_list, self.mask_ratio_tuple, self.mask_probability, self.dtype,
                                     n_tokens=self.n_tokens, mask_generator=self.mask_generator)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mask_ratio_tuple={self.mask_ratio_tuple}, "
            f"mask_probability={self.mask_probability}, dtype={self.dtype}, n_tokens={self.n_tokens}, "
            f"mask_generator={self.mask_generator!r})"
        )


class TrainingCollator:
    """``collate_fn`` for training: every random draw is a pure function of ``(seed, global sample position)``, so
    a batch is the same on any number of ranks and after a resume.

    Samples are the dicts of :class:`~ssl_distill.data.pipeline.SeededMultiCropDataset` (``crops``, ``position``,
    ``broken``). Mask ratios are stratified as in dinov2's ``collate_data_and_cast`` — ``n = int(n_global_crops *
    global_batch_size * mask_probability)`` crops get ratios from the strata of ``linspace(*mask_ratio_tuple,
    n + 1)``, one stratum each — but over the **global** batch (``global_batch_size`` samples: every rank computes
    the same seeded assignment of its crops to the strata) instead of over each rank's share; each crop's ratio
    and block layout come from its own seeded ``random.Random``. Returns the dict of :func:`collate_data_and_cast`
    plus ``positions`` (long ``(B,)``) and ``n_broken`` (long ``(1,)``, substituted broken images).
    ``mask_generator`` may be None when ``mask_probability`` is 0; ``n_tokens`` then gives ``N``.
    """

    def __init__(
        self,
        global_batch_size: int,
        mask_ratio_tuple: tuple[float, float],
        mask_probability: float,
        mask_generator: MaskingGenerator | None,
        seed: int,
        dtype: torch.dtype = torch.float32,
        n_tokens: int | None = None,
    ) -> None:
        _check_ratios(mask_ratio_tuple, mask_probability)
        self.n_tokens = _resolve_tokens(n_tokens, mask_generator, mask_probability)
        self.global_batch_size = int(global_batch_size)
        self.mask_ratio_tuple = (float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]))
        self.mask_probability = float(mask_probability)
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.dtype = dtype

    def _strata(self, batch_index: int, n_slots: int) -> tuple[torch.Tensor, list[float], int]:
        """``(stratum of every crop slot (a permutation), stratum edges, number of masked strata)``."""
        n_masked = int(n_slots * self.mask_probability)
        probs = torch.linspace(*self.mask_ratio_tuple, n_masked + 1).tolist()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "mask-strata", batch_index))
        return torch.randperm(n_slots, generator=generator), probs, n_masked

    def _masks(self, positions: list[int], n_global: int) -> list[torch.Tensor]:
        """One flat bool mask ``(N,)`` per global crop, crop-major, each seeded by (seed, position, crop)."""
        G, N = self.global_batch_size, self.n_tokens
        batch_index = positions[0] // G
        if any(p // G != batch_index for p in positions):
            raise ValueError(f"samples of one batch come from different global batches: positions {positions}.")
        perm, probs, n_masked = self._strata(batch_index, n_global * G)
        masks = []
        for c in range(n_global):
            for p in positions:
                stratum = int(perm[c * G + p % G])
                rng = random.Random(derive_seed(self.seed, "mask", p, c))
                if stratum < n_masked:
                    ratio = rng.uniform(probs[stratum], probs[stratum + 1])
                    masks.append(torch.from_numpy(self.mask_generator(int(N * ratio), rng=rng)).flatten())
                else:
                    masks.append(torch.zeros(N, dtype=torch.bool))
        return masks

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("samples is empty; a batch needs at least one sample.")
        pairs = [(s["crops"], None) for s in samples]
        global_crops = _stack_crop_major(pairs, "global_crops")
        local_crops = _stack_crop_major(pairs, "local_crops")
        positions = [int(s["position"]) for s in samples]
        masks = self._masks(positions, len(samples[0]["crops"]["global_crops"]))
        batch = _batch_dict(torch.stack(global_crops), torch.stack(local_crops) if local_crops else torch.empty(0),
                            masks, self.dtype)
        batch["positions"] = torch.tensor(positions, dtype=torch.long)
        batch["n_broken"] = torch.tensor([sum(int(s.get("broken", 0)) for s in samples)], dtype=torch.long)
        return batch
