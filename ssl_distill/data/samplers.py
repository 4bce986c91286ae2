"""An infinite, sharded, seeded, resumable sampler.

DINO/DINOv2 (Caron et al. 2021; Oquab et al. 2023) train for a number of *iterations* over an endless stream
of samples. This sampler defines that stream once, independently of how many processes read it:

* **Global stream.** Epoch ``e`` is the permutation ``torch.randperm(dataset_size, generator=g)`` with
  ``g = torch.Generator().manual_seed(epoch_seed(seed, e))`` (``range(dataset_size)`` itself when
  ``shuffle=False``). The stream is epoch 0, then epoch 1, ...; global position ``p`` is element
  ``p % dataset_size`` of epoch ``p // dataset_size``.
* **Sharding.** Rank ``r`` of ``W`` reads global positions ``start + r, start + r + W, start + r + 2W, ...``.
  If every rank draws batches of ``B``, global batch ``i`` is exactly positions
  ``[start + i*B*W, start + (i+1)*B*W)`` — the same samples whatever ``W`` is, only spread differently.
* **Resume.** ``start`` is a *global* position: the number of samples consumed by all ranks together,
  i.e. ``iteration * global_batch_size``. A run resumed with ``start = iteration * global_batch_size``
  continues at the exact next sample, also on a different number of ranks (as long as it keeps the same
  ``seed`` and ``dataset_size``). Jumping to ``start`` costs one permutation (O(1) in the number of epochs
  skipped), because each epoch's permutation has its own seed.

DINOv2's ``InfiniteSampler`` instead draws successive permutations from one generator, so resuming either
replays the stream from the start or restarts it; this is the "data order on resume" difference noted in
README ("Intentional differences from the reference implementation").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts``: the first 8 bytes of ``sha256(":".join(parts))``, little-endian.

    Hashing (rather than e.g. ``seed + epoch``) keeps the streams of nearby seeds unrelated.
    """
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s generator: ``derive_seed(seed, epoch)``."""
    return derive_seed(seed, epoch)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"InfiniteSampler: {name} must be an int >= {minimum}, got {value!r}")
    return value


class InfiniteSampler(Sampler[int]):
    """Yield dataset indices forever: this rank's share of one seeded global stream (see module docstring).

    Args:
        dataset_size: number of samples in the dataset (> 0).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of processes reading the stream.
        seed: stream seed; the same seed gives the same stream on any number of ranks.
        shuffle: a fresh permutation per epoch (``True``) or ``0, 1, ..., dataset_size - 1`` repeated.
        start: global position to start from = samples already consumed by *all* ranks together
            (``iteration * batch_size_per_rank * world_size`` when resuming after ``iteration`` steps).
        with_positions: yield ``(global_position, index)`` pairs instead of indices, so a dataset can seed each
            sample's augmentation from its position in the stream (world-size independent, exactly resumable).

    Has no ``__len__``: a DataLoader over it is infinite; the trainer decides when to stop.
    """

    def __init__(
        self,
        dataset_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        with_positions: bool = False,
    ) -> None:
        super().__init__()
        self.dataset_size = _check_int("dataset_size", dataset_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(
                f"InfiniteSampler: rank={rank} must be smaller than world_size={world_size}; pass the "
                "process's rank and world size from ssl_distill.distributed (get_rank(), get_world_size())."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"InfiniteSampler: seed must be an int, got {seed!r}")
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.start = _check_int("start", start, 0)
        self.with_positions = bool(with_positions)

    def epoch_order(self, epoch: int) -> list[int]:
        """The global stream's epoch ``epoch``: a permutation of ``range(dataset_size)`` as a list."""
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        position = self.start + self.rank  # next global position this rank reads
        while True:
            epoch, offset = divmod(position, self.dataset_size)
            chunk = self.epoch_order(epoch)[offset :: self.world_size]
            if self.with_positions:
                yield from ((position + k * self.world_size, index) for k, index in enumerate(chunk))
            else:
                yield from chunk
            # The next position is past this epoch; with world_size > dataset_size it may skip whole epochs.
            position += len(chunk) * self.world_size

    def __repr__(self) -> str:
        return (
            f"InfiniteSampler(dataset_size={self.dataset_size}, rank={self.rank}, "
            f"world_size={self.world_size}, seed={self.seed}, shuffle={self.shuffle}, start={self.start})"
        )
