"""collate_data_and_cast (the reference's name, an alias of TrainingCollator): crop order, stratified mask ratios,
weights, edge cases, and its use as a DataLoader's collate_fn through functools.partial (as dinov2's train.py)."""

from __future__ import annotations

import functools
import math
import pickle
import random

import numpy as np
import pytest
import torch

from ssl_distill.data import MaskingGenerator, MultiCropAugmentation, collate_data_and_cast


def labelled_samples(batch: int, n_global: int = 2, n_local: int = 3) -> list[tuple[dict, int]]:
    """Crop ``i`` of sample ``b`` is filled with ``100 * b + i`` (locals: ``100 * b + 50 + i``)."""
    samples = []
    for b in range(batch):
        glob = [torch.full((3, 8, 8), 100.0 * b + i) for i in range(n_global)]
        loc = [torch.full((3, 4, 4), 100.0 * b + 50 + i) for i in range(n_local)]
        samples.append(({"global_crops": glob, "local_crops": loc}, b))
    return samples


class SpyMasks:
    """Wraps a MaskingGenerator; records every requested count and the mask it returned."""

    def __init__(self, gen: MaskingGenerator) -> None:
        self.gen, self.num_patches, self.calls = gen, gen.num_patches, []

    def __call__(self, n: int = 0, rng: random.Random | None = None) -> np.ndarray:
        mask = self.gen(n, rng=rng)
        self.calls.append((n, mask))
        return mask


def test_crop_major_order_and_dtype_cast():
    B = 3
    out = collate_data_and_cast(
        labelled_samples(B), (0.1, 0.5), 0.5, torch.bfloat16, mask_generator=MaskingGenerator(4)
    )
    g, l = out["global_crops"], out["local_crops"]
    assert g.shape == (2 * B, 3, 8, 8)
    assert l.shape == (3 * B, 3, 4, 4)
    assert g.dtype == l.dtype == torch.bfloat16
    for i in range(2):
        for b in range(B):
            assert torch.all(g[i * B + b] == 100 * b + i)
    for i in range(3):
        for b in range(B):
            assert torch.all(l[i * B + b] == 100 * b + 50 + i)
    assert out["masks"].shape == (2 * B, 16)
    assert out["masks"].dtype == torch.bool


def test_mask_ratios_are_stratified_and_shuffled():
    lo, hi, B, p = 0.1, 0.5, 4, 0.5
    n_img = 2 * B
    n_masked = int(n_img * p)
    N = 14 * 14
    edges = [lo + (hi - lo) * k / n_masked for k in range(n_masked + 1)]  # linspace(lo, hi, n_masked + 1)
    masked_rows_first = []
    for seed in range(40):
        spy = SpyMasks(MaskingGenerator(14, rng=random.Random(seed)))
        out = collate_data_and_cast(
            labelled_samples(B), (lo, hi), p, torch.float32, mask_generator=spy, rng=random.Random(seed)
        )
        requested = sorted(n for n, _ in spy.calls)  # one mask drawn per masked image; the others are all False
        assert len(requested) == n_masked
        for k, r in enumerate(requested):  # the k-th smallest lies in the k-th stratum
            assert math.floor(N * edges[k] - 1e-4) <= r <= math.floor(N * edges[k + 1] + 1e-4), (seed, k, r)
        # the collated rows are the generated masks and n_img - n_masked empty masks, in some order
        rows = sorted(out["masks"][i].numpy().tobytes() for i in range(n_img))
        empty = np.zeros(N, dtype=bool).tobytes()
        assert rows == sorted([m.reshape(-1).tobytes() for _, m in spy.calls] + [empty] * (n_img - n_masked))
        row_sums = out["masks"].sum(1)
        masked_rows_first.append(bool(row_sums[:n_masked].all() and not row_sums[n_masked:].any()))
    assert not all(masked_rows_first)  # the masked images are shuffled across the batch


def test_indices_weights_and_counts():
    gen = MaskingGenerator(6, min_num_patches=2)
    torch.manual_seed(0)
    out = collate_data_and_cast(labelled_samples(5), (0.1, 0.6), 0.7, torch.float32, mask_generator=gen)
    masks = out["masks"]
    N = masks.shape[1]
    expected_idx = [r * N + j for r in range(masks.shape[0]) for j in range(N) if masks[r, j]]
    assert out["mask_indices"].tolist() == expected_idx
    per_row = {}
    for idx, w in zip(out["mask_indices"].tolist(), out["masks_weight"].tolist()):
        assert w == pytest.approx(1.0 / int(masks[idx // N].sum()))
        per_row[idx // N] = per_row.get(idx // N, 0.0) + w
    masked_rows = [r for r in range(masks.shape[0]) if masks[r].any()]
    assert sorted(per_row) == masked_rows
    assert len(masked_rows) == int(10 * 0.7)
    assert all(v == pytest.approx(1.0) for v in per_row.values())


def test_mask_probability_zero_gives_no_masks():
    out = collate_data_and_cast(labelled_samples(3), (0.1, 0.5), 0.0, torch.float32, mask_generator=MaskingGenerator(4))
    assert out["masks"].shape == (6, 16)
    assert not out["masks"].any()
    assert out["mask_indices"].numel() == 0
    assert out["masks_weight"].numel() == 0
    # without a generator, n_tokens alone is enough when nothing is masked
    out = collate_data_and_cast(labelled_samples(2), (0.1, 0.5), 0.0, torch.float32, n_tokens=9)
    assert out["masks"].shape == (4, 9)
    assert not out["masks"].any()


def test_zero_local_crops():
    out = collate_data_and_cast(
        labelled_samples(2, n_local=0), (0.1, 0.5), 0.5, torch.float16, mask_generator=MaskingGenerator(4)
    )
    loc = out["local_crops"]
    assert loc.shape == (0,)
    assert loc.dtype == torch.float16
    assert out["global_crops"].shape == (4, 3, 8, 8)


def test_real_photos_through_augmentation_and_collator(photos):
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    collator = functools.partial(collate_data_and_cast, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
                                 dtype=torch.float32, n_tokens=16, mask_generator=MaskingGenerator(4))
    torch.manual_seed(0)
    batch = collator([(aug(p), i) for i, p in enumerate(photos[:4])])
    assert batch["global_crops"].shape == (8, 3, 32, 32)
    assert batch["local_crops"].shape == (8, 3, 16, 16)
    assert batch["masks"].shape == (8, 16)
    assert int(batch["masks"].any(1).sum()) <= 4
    assert batch["mask_indices"].numel() == batch["masks"].sum().item()


def _partial_collator(mask_probability: float, mask_ratio_tuple: tuple[float, float] = (0.1, 0.5)):
    """The reference's collate_fn: ``partial(collate_data_and_cast, ...)``."""
    return functools.partial(collate_data_and_cast, mask_ratio_tuple=mask_ratio_tuple,
                             mask_probability=mask_probability, dtype=torch.float32, mask_generator=MaskingGenerator(6))


def test_partial_collator_pickles_and_follows_torch_seed():
    collator = _partial_collator(1.0)
    clone = pickle.loads(pickle.dumps(collator))
    assert clone.keywords["mask_generator"].num_patches == 36
    torch.manual_seed(3)
    a = collator(labelled_samples(4))
    torch.manual_seed(3)
    b = clone(labelled_samples(4))
    assert torch.equal(a["masks"], b["masks"])
    c = clone(labelled_samples(4))
    assert not torch.equal(a["masks"], c["masks"])


def test_dataloader_workers_draw_different_masks():
    collator = _partial_collator(1.0, (0.2, 0.6))
    data = [labelled_samples(1)[0]] * 4  # identical samples: only the masks can differ
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collator)
    first, second = list(loader)  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(first["masks"], second["masks"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_ratio_tuple": (0.5, 0.1)}, "mask_ratio_tuple"),
        ({"mask_ratio_tuple": (0.1, 1.5)}, "mask_ratio_tuple"),
        ({"mask_probability": 1.5}, "mask_probability"),
        ({"mask_generator": None}, "mask_generator"),
        ({"n_tokens": 10}, "n_tokens"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"mask_ratio_tuple": (0.1, 0.5), "mask_probability": 0.5, "dtype": torch.float32}
    args["mask_generator"] = MaskingGenerator(4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        collate_data_and_cast(labelled_samples(2), **args)
    with pytest.raises(ValueError, match="empty"):
        collate_data_and_cast([], (0.1, 0.5), 0.5, torch.float32, mask_generator=MaskingGenerator(4))
