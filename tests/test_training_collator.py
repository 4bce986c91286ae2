"""TrainingCollator, SeededMultiCropDataset and build_train_loader: the training input pipeline's draws are functions
of (seed, global sample position), so batches are the same on any number of ranks and after a resume; distillation's
batches draw no masks."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_distill.config import load_config
from ssl_distill.data import MaskingGenerator, MultiCropAugmentation, build_image_dataset, collate_data_and_cast
from ssl_distill.data import collate as collate_mod
from ssl_distill.data.collate import MASK_KEYS, TrainingCollator
from ssl_distill.data.pipeline import SeededMultiCropDataset, build_train_dataset, build_train_loader

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"

GRID = 8  # 64 patches per global crop: every masked crop gets >= int(64 * 0.1) = 6 patches
N_GLOBAL = 2


def samples(positions: list[int], n_local: int = 1, broken: tuple[int, ...] = ()) -> list[dict]:
    """Seeded-dataset-style samples; crop ``i`` of the sample at position ``p`` is filled with ``10 * p + i``."""
    out = []
    for p in positions:
        glob = [torch.full((3, 16, 16), 10.0 * p + i) for i in range(N_GLOBAL)]
        loc = [torch.full((3, 8, 8), 10.0 * p + 5 + i) for i in range(n_local)]
        out.append({"crops": {"global_crops": glob, "local_crops": loc}, "position": p, "broken": int(p in broken)})
    return out


class SpyMasks(MaskingGenerator):
    """A MaskingGenerator that records the number of patches each call asked for."""

    def __init__(self) -> None:
        super().__init__(GRID)
        self.requested: list[int] = []

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        self.requested.append(num_masking_patches)
        return super().__call__(num_masking_patches, rng=rng)


def collator(global_batch: int, probability: float = 0.5, seed: int = 3, generator=None) -> TrainingCollator:
    return TrainingCollator(global_batch, (0.1, 0.5), probability, generator or MaskingGenerator(GRID), seed=seed)


def _rows_by_crop(batch: dict, positions: list[int]) -> dict[tuple[int, int], torch.Tensor]:
    """(position, global crop) -> its mask row (rows are crop-major: crop c of sample b is row c * B + b)."""
    B = len(positions)
    return {(p, c): batch["masks"][c * B + b] for c in range(N_GLOBAL) for b, p in enumerate(positions)}


def test_crop_major_layout_positions_and_broken_count():
    positions = [8, 9, 10]
    batch = collator(4)(samples(positions, n_local=2, broken=(9,)))
    g, loc = batch["global_crops"], batch["local_crops"]
    assert g.shape == (N_GLOBAL * 3, 3, 16, 16)
    assert loc.shape == (2 * 3, 3, 8, 8)
    for c in range(N_GLOBAL):
        for b, p in enumerate(positions):
            assert torch.all(g[c * 3 + b] == 10 * p + c)
    assert batch["positions"].tolist() == positions
    assert batch["n_broken"].tolist() == [1]
    masks = batch["masks"]
    assert batch["mask_indices"].tolist() == masks.flatten().nonzero().flatten().tolist()
    counts = masks.sum(1)
    expected_weights = torch.cat([torch.full((int(n),), 1.0 / int(n)) for n in counts if n > 0])
    torch.testing.assert_close(batch["masks_weight"], expected_weights)


def test_a_global_batch_gets_the_same_masks_however_it_is_split_over_ranks():
    G = 8
    positions = list(range(16, 16 + G))  # global batch index 2
    whole = _rows_by_crop(collator(G)(samples(positions)), positions)
    for shares in ([positions[:4], positions[4:]], [positions[0::2], positions[1::2]],
                   [positions[:1], positions[1:3], positions[3:]]):
        for share in shares:
            rows = _rows_by_crop(collator(G)(samples(share)), share)
            for key, row in rows.items():
                assert torch.equal(row, whole[key]), (share, key)
    # ... and again after a "resume": a new collator with the same seed
    assert all(torch.equal(r, whole[k]) for k, r in _rows_by_crop(collator(G)(samples(positions)), positions).items())


def test_mask_ratios_are_stratified_over_the_global_batch():
    G, p = 8, 0.5
    n_masked = int(N_GLOBAL * G * p)
    edges = np.linspace(0.1, 0.5, n_masked + 1)
    for seed in range(5):
        spy = SpyMasks()
        coll = collator(G, p, seed=seed, generator=spy)
        masked_rows = 0
        for share in ([0, 1, 2], [3, 4, 5, 6, 7]):  # two ranks' shares of global batch 0
            masked_rows += int(coll(samples(share))["masks"].any(1).sum())
        assert masked_rows == n_masked  # exactly int(n_global * G * p) masked crops in the global batch
        requested = sorted(spy.requested)
        assert len(requested) == n_masked
        for k, r in enumerate(requested):  # one ratio per stratum of linspace(min, max, n + 1)
            assert int(GRID * GRID * edges[k] - 1e-4) <= r <= int(GRID * GRID * edges[k + 1] + 1e-4), (seed, k, r)


def test_seed_changes_masks_and_a_batch_may_not_span_two_global_batches():
    positions = [0, 1, 2, 3]
    a = collator(4, 1.0, seed=1)(samples(positions))["masks"]
    b = collator(4, 1.0, seed=2)(samples(positions))["masks"]
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="different global batches"):
        collator(4)(samples([2, 3, 4, 5]))
    with pytest.raises(ValueError, match="empty"):
        collator(4)([])


def test_no_generator_needed_when_nothing_is_masked():
    batch = TrainingCollator(2, (0.1, 0.5), 0.0, None, seed=0, n_tokens=9)(samples([0, 1]))
    assert batch["masks"].shape == (4, 9)
    assert not batch["masks"].any()
    with pytest.raises(ValueError, match="mask_generator"):
        TrainingCollator(2, (0.1, 0.5), 0.5, None, seed=0, n_tokens=9)


def test_without_masks_the_batch_has_no_mask_keys_and_the_same_crops():
    with_masks = collator(4, 1.0)(samples([0, 1]))
    batch = TrainingCollator(4, (0.1, 0.5), 0.0, None, seed=3, masks=False)(samples([0, 1]))
    assert set(with_masks) - set(batch) == set(MASK_KEYS)
    assert all(torch.equal(value, with_masks[key]) for key, value in batch.items())
    for bad in ({"mask_probability": 0.5}, {"mask_generator": MaskingGenerator(GRID)}, {"n_tokens": 9}):
        args = {"mask_probability": 0.0, "mask_generator": None, **bad}
        with pytest.raises(ValueError, match="masks=False draws no masks"):
            TrainingCollator(4, (0.1, 0.5), seed=3, masks=False, **args)


def test_collate_data_and_cast_is_the_training_collator_on_one_global_batch():
    B = 3
    pairs = [(s["crops"], None) for s in samples(list(range(B)))]
    ref = collate_data_and_cast(pairs, (0.1, 0.5), 0.5, torch.float16, mask_generator=MaskingGenerator(GRID),
                                rng=random.Random(7))
    seed = random.Random(7).getrandbits(63)
    train = TrainingCollator(B, (0.1, 0.5), 0.5, MaskingGenerator(GRID), seed, torch.float16)(samples(list(range(B))))
    assert set(train) - set(ref) == {"positions", "n_broken"}
    for key, value in ref.items():
        assert torch.equal(value, train[key]), key


# ---------------------------------------------------------------- SeededMultiCropDataset
def _dataset(folder: str | Path) -> SeededMultiCropDataset:
    images = build_image_dataset(folder, return_broken_flag=True)
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    return SeededMultiCropDataset(images, aug, seed=5)


def _crops_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for key in ("global_crops", "local_crops") for x, y in zip(a[key], b[key]))


def test_seeded_dataset_draws_are_a_function_of_the_position(photo_folder):
    ds = _dataset(photo_folder)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = ds[(40, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(999)  # ... and does not matter
    again = ds[(40, 3)]
    assert first["position"] == 40
    assert first["broken"] == 0
    assert _crops_equal(first["crops"], again["crops"])
    other = ds[(41, 3)]  # same image, next position in the stream: other crops
    assert not _crops_equal(first["crops"], other["crops"])
    assert len(first["crops"]["global_crops"]) == 2
    assert len(first["crops"]["local_crops"]) == 2
    assert len(ds) == 48


def test_seeded_dataset_reports_substituted_broken_images(tmp_path, photo_folder):
    for i, src in enumerate(sorted(Path(photo_folder).iterdir())[:3]):
        (tmp_path / f"img_{i}.jpg").write_bytes(src.read_bytes())
    (tmp_path / "img_1.jpg").write_bytes(b"not an image")
    ds = _dataset(tmp_path)
    assert ds[(0, 1)]["broken"] == 1  # replaced by the next readable image, and counted
    assert ds[(0, 0)]["broken"] == 0
    with pytest.raises(ValueError, match="return_broken_flag=True"):
        SeededMultiCropDataset(build_image_dataset(photo_folder), MultiCropAugmentation(), seed=0)


# ---------------------------------------------------------------- build_train_loader
# The masked patches (``mask_indices``) of the tiny config's first two batches from position 8 on, computed by main's
# loader before issue 28 moved it into data/pipeline.py: the masks depend only on the seed, the positions and the
# config (not on the images), so the pretraining batches must keep them exactly.
MASKED_BEFORE = {
    (8, 9, 10, 11): [50, 51, 54, 55, 58, 71, 75, 79, 80, 88, 89, 90, 92, 93, 94, 124],
    (12, 13, 14, 15): [22, 23, 25, 26, 27, 30, 31, 38, 39, 42, 43, 100, 101, 105, 109, 115, 119],
}


def _loader(photo_folder: str, *overrides: str) -> torch.utils.data.DataLoader:
    cfg = load_config(TINY, [f"train.dataset_path={photo_folder}", "train.batch_size_per_gpu=4", *overrides])
    return build_train_loader(cfg, build_train_dataset(cfg), 8, pin_memory=False)


def test_pretraining_batches_keep_their_masks_and_crops(photo_folder):
    loader = _loader(photo_folder)
    pairs = list(itertools.islice(iter(loader.sampler), 8))  # (position, index) of the next 8 samples
    for batch, share in zip(itertools.islice(iter(loader), 2), (pairs[:4], pairs[4:])):
        positions = tuple(p for p, _ in share)
        assert tuple(batch["positions"].tolist()) == positions
        assert batch["mask_indices"].tolist() == MASKED_BEFORE[positions]
        assert batch["masks"].flatten().nonzero().flatten().tolist() == MASKED_BEFORE[positions]
        crops = [loader.dataset[pair]["crops"] for pair in share]  # each sample's seeded crops, one by one
        for key in ("global_crops", "local_crops"):
            assert torch.equal(batch[key], torch.stack([c[key][i] for i in range(2) for c in crops])), key


def test_distillation_batches_draw_no_masks_and_keep_the_crops(photo_folder, monkeypatch):
    drawn: list[str] = []
    real = collate_mod.derive_seed
    monkeypatch.setattr(collate_mod, "derive_seed", lambda *parts: drawn.append(parts[1]) or real(*parts))
    pretrain = list(itertools.islice(iter(_loader(photo_folder)), 2))
    assert {"mask", "mask-strata"} <= set(drawn)  # the collator's mask draws are all seeded here
    drawn.clear()
    loader = _loader(photo_folder, "train.mode=distill", "distill.teacher_weights=dinov2_vits14")
    distill = list(itertools.islice(iter(loader), 2))
    assert drawn == []
    assert loader.collate_fn.mask_generator is None
    for p, d in zip(pretrain, distill):
        assert set(p) - set(d) == set(MASK_KEYS)
        for key, value in d.items():
            assert torch.equal(value, p[key]), key
