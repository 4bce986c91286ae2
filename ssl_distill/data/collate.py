"""Collate multi-crop samples and iBOT masks into one batch dict (DINOv2, Oquab et al. 2023).

Semantics follow dinov2's ``data/collate.py``: crops are stacked crop-major, and the masked images draw their mask
ratios stratified over ``linspace(*mask_ratio_tuple, n_masked + 1)`` so every batch spans the whole ratio range.

**The batch keys** — the one vocabulary of a training batch, from :class:`TrainingCollator` through the loader to
the step (``train/arch_base.py`` moves the tensors to the device under the same names). ``B`` samples, ``n_g``
global crops ``(C, G, G)`` and ``n_l`` local crops ``(C, L, L)`` each, ``N`` patches per global crop, ``M`` masked
patches in all:

=================  =====================  ====================================================================
key                shape, dtype           content
=================  =====================  ====================================================================
``global_crops``   ``(n_g * B, C, G, G)`` the global crops, crop-major: row ``i * B + b`` is crop ``i`` of
                                          sample ``b``; the collator's ``dtype``
``local_crops``    ``(n_l * B, C, L, L)`` the local crops, crop-major; an empty ``(0,)`` tensor without local
                                          crops (their size cannot be known)
``masks``          bool ``(n_g * B, N)``  the iBOT mask of each global crop (True = masked)
``mask_indices``   long ``(M,)``          flat indices of the masked patches in ``masks``
``masks_weight``   ``(M,)``               ``1 / masked patches of its crop`` (sums to 1 per masked crop)
``positions``      long ``(B,)``          each sample's global stream position (the stochastic-depth keys);
                                          host only (:data:`HOST_KEYS`)
``n_broken``       long ``(1,)``          broken images substituted in this batch; host only
=================  =====================  ====================================================================

The three mask keys are absent when the collator draws no masks (``masks=False``: an objective that reads none,
distillation). The reference's ``collated_global_crops`` / ``collated_local_crops`` / ``collated_masks`` /
``mask_indices_list`` are ``global_crops`` / ``local_crops`` / ``masks`` / ``mask_indices`` here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .masking import MaskingGenerator, torch_seeded_random
from .samplers import derive_seed

__all__ = ["HOST_KEYS", "MASK_KEYS", "collate_data_and_cast", "TrainingCollator"]

MASK_KEYS = ("masks", "mask_indices", "masks_weight")
HOST_KEYS = ("positions", "n_broken")  # bookkeeping the host reads; never copied to the device


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


def _stack_crop_major(crops: Sequence[dict[str, list[torch.Tensor]]], key: str) -> list[torch.Tensor]:
    n_crops = len(crops[0][key])
    for sample in crops:
        if len(sample[key]) != n_crops:
            raise ValueError(f"every sample must have the same number of {key} ({n_crops}), got {len(sample[key])}.")
    return [sample[key][i] for i in range(n_crops) for sample in crops]


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict, Any]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Stack crops crop-major and draw iBOT masks for the global crops: the reference's function and signature,
    kept for its users (``functools.partial(collate_data_and_cast, ...)`` as a ``DataLoader``'s ``collate_fn``).

    An alias of :class:`TrainingCollator`, the one implementation: the call is one global batch at sample positions
    ``0 .. B-1`` whose seed is drawn from ``rng`` (default: from torch's RNG, so DataLoader workers, which torch
    reseeds per worker, draw different masks). The batch has this module's keys (see its table) except the
    training-only ``positions`` and ``n_broken``; the reference calls them ``collated_global_crops`` ... .

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
        ``global_crops``, ``local_crops``, ``masks``, ``mask_indices``, ``masks_weight`` (the module's table).
    """
    if len(samples_list) == 0:
        raise ValueError("samples_list is empty; a batch needs at least one sample.")
    seed = (rng if rng is not None else torch_seeded_random()).getrandbits(63)
    collator = TrainingCollator(len(samples_list), mask_ratio_tuple, mask_probability, mask_generator, seed, dtype,
                                n_tokens=n_tokens)
    batch = collator([{"crops": crops, "position": b} for b, (crops, _) in enumerate(samples_list)])
    for key in HOST_KEYS:  # training's bookkeeping (stochastic-depth keys, broken-image count)
        del batch[key]
    return batch


class TrainingCollator:
    """``collate_fn`` for training: every random draw is a pure function of ``(seed, global sample position)``, so
    a batch is the same on any number of ranks and after a resume.

    Samples are the dicts of :class:`~ssl_distill.data.pipeline.SeededMultiCropDataset` (``crops``, ``position``,
    ``broken``). Mask ratios are stratified as in dinov2's ``collate_data_and_cast`` — ``n = int(n_global_crops *
    global_batch_size * mask_probability)`` crops get ratios from the strata of ``linspace(*mask_ratio_tuple,
    n + 1)``, one stratum each — but over the **global** batch (``global_batch_size`` samples: every rank computes
    the same seeded assignment of its crops to the strata) instead of over each rank's share; each crop's ratio
    and block layout come from its own seeded ``random.Random``. Returns the batch of the module's table.
    ``mask_generator`` may be None when ``mask_probability`` is 0; ``n_tokens`` then gives ``N``.
    ``masks=False`` (with ``mask_probability`` 0 and no generator): the batch has no mask keys and nothing is drawn
    for them, for an objective that reads no masks; the crops are the same as with masks (their draws have keys of
    their own).
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
        masks: bool = True,
    ) -> None:
        _check_ratios(mask_ratio_tuple, mask_probability)
        self.masks = bool(masks)
        if self.masks:
            self.n_tokens: int | None = _resolve_tokens(n_tokens, mask_generator, mask_probability)
        elif mask_probability > 0 or mask_generator is not None or n_tokens is not None:
            raise ValueError("masks=False draws no masks: pass mask_probability=0 and no mask_generator or n_tokens "
                             f"(got mask_probability={mask_probability!r}), or keep masks=True.")
        else:
            self.n_tokens = None
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

    def _masks(self, positions: list[int], n_global: int) -> torch.Tensor:
        """One flat bool mask ``(N,)`` per global crop, crop-major ``(n_global * B, N)``, each seeded by (seed,
        position, crop); nothing is drawn when no crop is masked."""
        G, N = self.global_batch_size, self.n_tokens
        batch_index = positions[0] // G
        if any(p // G != batch_index for p in positions):
            raise ValueError(f"samples of one batch come from different global batches: positions {positions}.")
        masks = torch.zeros(n_global * len(positions), N, dtype=torch.bool)
        if int(n_global * G * self.mask_probability) == 0:
            return masks
        perm, probs, n_masked = self._strata(batch_index, n_global * G)
        for c in range(n_global):
            for b, p in enumerate(positions):
                stratum = int(perm[c * G + p % G])
                if stratum < n_masked:
                    rng = random.Random(derive_seed(self.seed, "mask", p, c))
                    ratio = rng.uniform(probs[stratum], probs[stratum + 1])
                    masks[c * len(positions) + b] = torch.from_numpy(self.mask_generator(int(N * ratio), rng=rng)
                                                                     ).flatten()
        return masks

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("samples is empty; a batch needs at least one sample.")
        crops = [s["crops"] for s in samples]
        local_crops = _stack_crop_major(crops, "local_crops")
        batch = {
            "global_crops": torch.stack(_stack_crop_major(crops, "global_crops")).to(self.dtype),
            "local_crops": (torch.stack(local_crops) if local_crops else torch.empty(0)).to(self.dtype),
        }
        positions = [int(s["position"]) for s in samples]
        if self.masks:
            batch.update(_mask_keys(self._masks(positions, len(crops[0]["global_crops"]))))
        batch["positions"] = torch.tensor(positions, dtype=torch.long)
        batch["n_broken"] = torch.tensor([sum(int(s.get("broken", 0)) for s in samples)], dtype=torch.long)
        return batch


def _mask_keys(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``masks``, ``mask_indices`` and ``masks_weight`` from the bool masks ``(n_g * B, N)``."""
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {"masks": masks, "mask_indices": masks.flatten().nonzero().flatten(), "masks_weight": weight}
