"""MaskingGenerator: agreement with the reference loop, counts, block shapes, per-block cap, seeding, repr."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ssl_distill.data import MaskingGenerator


def reference_mask(height, width, n, rng, min_num_patches=4, max_num_patches=None, min_aspect=0.3, max_aspect=None):
    """dinov2's data/masking.py written out with explicit loops, drawing from ``rng``."""
    min_num, max_num = min_num_patches, (height * width if max_num_patches is None else max_num_patches)
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros((height, width), dtype=bool)

    def one_block(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_num, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    count = 0
    while count < n:
        delta = one_block(min(n - count, max_num))
        if delta == 0:
            break
        count += delta
    return mask


@pytest.mark.parametrize(
    "size, kwargs",
    [((14, 14), {}), ((8, 12), {"max_num_patches": 10, "min_aspect": 0.5}), ((16, 16), {"max_num_patches": 128.0})],
)
def test_matches_reference_loop_bit_for_bit(size, kwargs):
    for seed in range(30):
        n = random.Random(1000 + seed).randint(0, size[0] * size[1] // 2)
        ours = MaskingGenerator(size, rng=random.Random(seed), **kwargs)(n)
        ref = reference_mask(*size, n, random.Random(seed), **kwargs)
        assert ours.dtype == np.bool_
        assert ours.shape == size
        assert np.array_equal(ours, ref), (seed, n)


def test_counts_within_bounds():
    gen = MaskingGenerator(14, rng=random.Random(0))
    for n in range(0, 99, 7):
        counts = [int(gen(n).sum()) for _ in range(40)]
        assert max(counts) <= n
        if n >= gen.min_num_patches:
            # proposals only fail near the end, once fewer than min_num_patches remain
            assert min(counts) >= max(1, n - gen.min_num_patches)
            assert np.mean(counts) >= 0.97 * n
        else:
            assert n > 0 or max(counts) == 0


def bounding_box(mask):
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


@pytest.mark.parametrize("min_aspect, max_aspect", [(0.3, None), (1.0, 1.0), (4.0, 4.0), (0.2, 0.5)])
def test_single_blocks_are_rectangles_within_aspect_and_area(min_aspect, max_aspect):
    gen = MaskingGenerator((12, 14), min_num_patches=4, min_aspect=min_aspect, max_aspect=max_aspect)
    lo_a, hi_a = min_aspect, max_aspect or 1 / min_aspect
    rng = random.Random(3)
    for _ in range(200):
        max_mask = rng.uniform(4, 60)
        mask = np.zeros((12, 14), dtype=bool)
        delta = gen._mask(mask, max_mask, rng)
        if delta == 0:
            assert not mask.any()
            continue
        r0, r1, c0, c1 = bounding_box(mask)
        h, w = r1 - r0, c1 - c0
        assert mask[r0:r1, c0:c1].all()
        assert mask.sum() == delta == h * w  # one filled rectangle
        assert h < 12
        assert w < 14
        assert delta <= max_mask
        # h = round(sqrt(t * a)), w = round(sqrt(t / a)) for some aspect a in [lo_a, hi_a] and area t >= 4
        a_lo, a_hi = (h - 0.5) / (w + 0.5), (h + 0.5) / max(w - 0.5, 1e-9)
        assert a_lo <= hi_a + 1e-9, (h, w)
        assert a_hi >= lo_a - 1e-9, (h, w)
        assert (h + 0.5) * (w + 0.5) >= 4
        if min_aspect == max_aspect == 1.0:
            assert h == w
        if min_aspect == 4.0:
            assert h > w


class SpyGenerator(MaskingGenerator):
    """Records (max_mask_patches, delta) for every block step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def _mask(self, mask, max_mask_patches, rng):
        delta = super()._mask(mask, max_mask_patches, rng)
        self.log.append((max_mask_patches, delta))
        return delta


def test_max_num_patches_caps_every_block():
    gen = SpyGenerator(14, max_num_patches=6, min_num_patches=2, rng=random.Random(1))
    for n in (5, 17, 40, 90):
        gen.log.clear()
        mask = gen(n)
        done = 0
        for cap, delta in gen.log:
            assert cap == min(n - done, 6)
            assert 0 <= delta <= cap
            done += delta
        assert done == mask.sum() <= n
        assert len(gen.log) >= math.ceil(mask.sum() / 6)


def test_seeding():
    a = [MaskingGenerator(14, rng=random.Random(7))(50) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    b = MaskingGenerator(14, rng=random.Random(8))(50)
    assert not np.array_equal(a[0], b)
    gen = MaskingGenerator(14)  # default: seeded from torch's global RNG at each call
    torch.manual_seed(0)
    c = [gen(50) for _ in range(3)]
    torch.manual_seed(0)
    d = [gen(50) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(c, d))
    assert not np.array_equal(c[0], c[1])
    state = random.getstate()
    gen(50)
    assert random.getstate() == state  # the module-level random is never used


def test_repr_and_shape():
    gen = MaskingGenerator((6, 9))
    text = repr(gen)
    assert "(6, 9)" in text
    assert "max_num_patches=54" in text
    assert gen.get_shape() == (6, 9)
    assert gen.num_patches == 54
    assert "min_num_patches=4" in repr(MaskingGenerator(5, max_num_patches=None))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": 0}, "input_size"),
        ({"input_size": (4, -1)}, "input_size"),
        ({"input_size": (4, 4, 4)}, "input_size"),
        ({"input_size": 8, "min_aspect": 0.0}, "min_aspect"),
        ({"input_size": 8, "min_aspect": -1.0}, "min_aspect"),
        ({"input_size": 8, "min_num_patches": 0}, "min_num_patches"),
        ({"input_size": 8, "max_num_patches": 0}, "max_num_patches"),
        ({"input_size": 8, "min_aspect": 2.0, "max_aspect": 1.0}, "max_aspect"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskingGenerator(**kwargs)
    with pytest.raises(TypeError, match="rng"):
        MaskingGenerator(8, rng=np.random.default_rng(0))
