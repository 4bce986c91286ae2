"""The training loader: dataset -> seeded multi-crop samples -> :class:`~ssl_distill.data.collate.TrainingCollator`,
built from the config.

    dataset = build_train_dataset(cfg)                       # the data source of train.dataset_path (fails fast)
    loader = build_train_loader(cfg, dataset, start_position, pin_memory)

Every random draw of a sample (crops, colour, blur, masks) is a pure function of ``(seed, global position)``, where
the global position comes from :class:`~ssl_distill.data.samplers.InfiniteSampler` (``with_positions=True``). The
batches are therefore identical whatever the number of ranks or DataLoader workers, and a resumed run sees exactly
the samples an uninterrupted run would have seen.

Where things plug in (docs/ARCHITECTURE.md, "Where to add"): a data source is a dataset class chosen in
:func:`build_train_dataset` (random access by index, so a resume is exact; see :class:`TrainingImages`); an
augmentation's probability maps from its ``crops.*_p`` key in :func:`augmentation_probabilities`.
"""

from __future__ import annotations

import signal
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from ssl_distill import distributed

from .augment import MultiCropAugmentation
from .collate import TrainingCollator
from .datasets import build_image_dataset
from .masking import MaskingGenerator
from .samplers import InfiniteSampler, derive_seed


class TrainingImages(Protocol):
    """What the training loader asks of a data source: ``len(source)`` images, ``source[i]`` the triple
    ``(image, label, substituted)`` — a PIL image or uint8 ``(C, H, W)`` tensor, its label (``-1`` if none), and
    ``1`` when a broken file was replaced by another image (else ``0``) — for any ``0 <= i < len``, in any order
    (random access keeps a resume exact), and ``return_broken_flag`` True.
    :class:`~ssl_distill.data.datasets.ImageDataset` (``return_broken_flag=True``) is one."""

    return_broken_flag: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, int, int]: ...


class SeededMultiCropDataset(torch.utils.data.Dataset):
    """Wrap a :class:`TrainingImages` source (no transform) with seeded multi-crop augmentation.

    Indexed by ``(global_position, index)`` pairs; returns ``{"crops": augmentation dict, "position": int,
    "broken": 0 | 1}``. The global torch RNG is forked around each sample, so the caller's RNG is untouched.
    """

    def __init__(self, dataset: TrainingImages, augmentation: MultiCropAugmentation, seed: int) -> None:
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


def build_train_dataset(cfg: DictConfig) -> TrainingImages:
    """The data source of ``train.dataset_path`` (checked before anything else is built, so a wrong path fails
    fast): the one place that maps a path to a dataset class. Today every path is an image folder, class tree or
    list file (:func:`~ssl_distill.data.datasets.build_image_dataset`); another source (e.g. indexed tar shards)
    is one more class here, picked by its path, returning what :class:`TrainingImages` states."""
    return build_image_dataset(cfg.train.dataset_path, bad_image_policy=cfg.train.bad_image_policy,
                               return_broken_flag=True)


def augmentation_probabilities(cfg: DictConfig) -> dict[str, float]:
    """The ``crops.*_p`` keys as :class:`MultiCropAugmentation` keyword arguments."""
    c = cfg.crops
    blur = list(c.blur_p)
    return {"flip_p": c.horizontal_flip_p, "color_jitter_p": c.color_jitter_p, "grayscale_p": c.grayscale_p,
            "global1_blur_p": blur[0], "global2_blur_p": blur[1], "local_blur_p": blur[2],
            "global2_solarize_p": c.solarize_p}


def build_augmentation(cfg: DictConfig) -> MultiCropAugmentation:
    """The multi-crop augmentation of the ``crops`` section."""
    c = cfg.crops
    return MultiCropAugmentation(
        tuple(c.global_crops_scale), tuple(c.local_crops_scale), c.local_crops_number,
        c.global_crops_size, c.local_crops_size, c.rotation_degrees, **augmentation_probabilities(cfg),
    )


def draws_masks(cfg: DictConfig) -> bool:
    """Whether the training objective reads iBOT masks: pretraining does (the student sees masked global crops,
    also with ``ibot.loss_weight=0``, as in DINOv2); distillation (``train.mode=distill``) does not — its student
    sees unmasked crops (DINOv2 paper §5), so its batches carry no masks and nothing is drawn for them."""
    return cfg.train.mode != "distill"


def build_collator(cfg: DictConfig) -> TrainingCollator:
    """The collator of the global batch (``train.batch_size_per_gpu`` x world size): iBOT masks from the ``ibot``
    section over the global crops' patch grid (a block adds at most half of it), or none (:func:`draws_masks`)."""
    global_batch = cfg.train.batch_size_per_gpu * distributed.get_world_size()
    ratios = tuple(cfg.ibot.mask_ratio_min_max)
    if not draws_masks(cfg):
        return TrainingCollator(global_batch, ratios, 0.0, None, seed=cfg.train.seed, masks=False)
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return TrainingCollator(global_batch, ratios, cfg.ibot.mask_sample_probability,
                            MaskingGenerator(side, max_num_patches=0.5 * side * side), seed=cfg.train.seed)


def worker_ignores_ctrl_c(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (which the terminal sends to the whole process group) to the main process,
    which stops after a checkpoint: a worker that died of it would break the loader in the middle of that. SIGTERM
    keeps its default: the loader's own shutdown (and multiprocessing's at exit) terminates workers with it (a worker
    ignoring it once hung the exit). When a SIGTERM to the whole process group kills the workers first, the loop
    sees the loader fail at its next batch and stops as the signal asks (``train/loader_watch.py``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(cfg: DictConfig, dataset: TrainingImages, start_position: int,
                       pin_memory: bool, timeout_s: float = 0.0) -> torch.utils.data.DataLoader:
    """Seeded multi-crop batches of ``dataset`` (keys: ``data/collate.py``), this rank's share, from global
    ``start_position`` on.

    ``timeout_s > 0`` (with workers): a batch that takes longer raises ``RuntimeError("DataLoader timed out ...")``
    instead of waiting forever (the benchmarks bound themselves with it; training waits, as a slow file system may
    legitimately stall)."""
    sampler = InfiniteSampler(
        len(dataset), distributed.get_rank(), distributed.get_world_size(), seed=cfg.train.seed,
        start=start_position, with_positions=True,
    )
    workers = cfg.train.num_workers
    return torch.utils.data.DataLoader(
        SeededMultiCropDataset(dataset, build_augmentation(cfg), cfg.train.seed),
        batch_size=cfg.train.batch_size_per_gpu, sampler=sampler, num_workers=workers, collate_fn=build_collator(cfg),
        pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None, worker_init_fn=worker_ignores_ctrl_c if workers > 0 else None,
        timeout=timeout_s if workers > 0 else 0.0,
    )
