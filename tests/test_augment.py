"""MultiCropAugmentation on real photos: shapes, ranges, determinism, input kinds, and the random-op rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from ssl_distill.data import MultiCropAugmentation

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def small_aug(n_local: int = 3) -> MultiCropAugmentation:
    return MultiCropAugmentation(local_crops_number=n_local, global_crops_size=32, local_crops_size=16)


def all_crops(out: dict) -> list[torch.Tensor]:
    return out["global_crops"] + out["local_crops"]


def test_shapes_dtype_and_teacher_on_every_photo(photos):
    aug = small_aug(3)
    torch.manual_seed(0)
    for photo in photos:  # includes rectangular photos and the grayscale "camera"
        out = aug(photo)
        assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
        assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
        assert out["offsets"] == ()
        for crop in out["global_crops"]:
            assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
        for crop in out["local_crops"]:
            assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32
        assert len(out["global_crops_teacher"]) == 2
        for a, b in zip(out["global_crops_teacher"], out["global_crops"]):
            assert torch.equal(a, b)


def test_default_sizes(photos):
    torch.manual_seed(0)
    out = MultiCropAugmentation()(photos[0])
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 96, 96)] * 8


def test_values_are_imagenet_normalised_unit_range(photos):
    aug = small_aug(2)
    lo, hi = (0 - MEAN) / STD - 1e-5, (1 - MEAN) / STD + 1e-5
    torch.manual_seed(1)
    for photo in photos:
        for crop in all_crops(aug(photo)):
            assert torch.all(crop >= lo) and torch.all(crop <= hi)
            assert crop.std() > 0.01  # a real photo crop is not constant


def test_same_seed_same_crops_different_seed_different(photos):
    aug = small_aug(2)
    torch.manual_seed(123)
    a = all_crops(aug(photos[2]))
    torch.manual_seed(123)
    b = all_crops(aug(photos[2]))
    torch.manual_seed(124)
    c = all_crops(aug(photos[2]))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))


def test_zero_local_crops(photos):
    torch.manual_seed(0)
    out = MultiCropAugmentation(local_crops_number=0, global_crops_size=32, local_crops_size=16)(photos[1])
    assert out["local_crops"] == [] and len(out["global_crops"]) == 2


def test_pil_and_uint8_tensor_inputs_agree(photos):
    aug = small_aug(2)
    photo = photos[3]
    chw = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    torch.manual_seed(5)
    from_pil = all_crops(aug(photo))
    torch.manual_seed(5)
    from_tensor = all_crops(aug(chw))
    assert all(torch.equal(x, y) for x, y in zip(from_pil, from_tensor))
    # RGBA (PIL and 4-channel tensor) drops alpha: same crops as the RGB photo.
    rgba = photo.copy()
    rgba.putalpha(77)
    for inp in (rgba, torch.cat([chw, torch.full_like(chw[:1], 77)])):
        torch.manual_seed(5)
        assert all(torch.equal(x, y) for x, y in zip(from_pil, all_crops(aug(inp))))


def test_grayscale_inputs_become_three_equal_channels(photos):
    camera = next(p for p in photos if p.mode == "L")
    aug = small_aug(2)
    gray = torch.from_numpy(np.array(camera))
    for inp in (camera, gray, gray.unsqueeze(0)):
        torch.manual_seed(9)
        for crop in all_crops(aug(inp)):
            rgb01 = crop * STD + MEAN  # undo the normalisation: a gray image has R == G == B
            assert torch.allclose(rgb01[0], rgb01[1], atol=1e-5) and torch.allclose(rgb01[1], rgb01[2], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"global_crops_scale": (0.0, 1.0)}, "global_crops_scale"),
        ({"global_crops_scale": (0.5, 0.4)}, "global_crops_scale"),
        ({"local_crops_scale": (0.05, 1.2)}, "local_crops_scale"),
        ({"local_crops_scale": 0.3}, "local_crops_scale"),
        ({"global_crops_size": 0}, "global_crops_size"),
        ({"global_crops_size": 224.0}, "global_crops_size"),
        ({"local_crops_size": -3}, "local_crops_size"),
        ({"local_crops_size": 256}, "local_crops_size"),
        ({"local_crops_number": -1}, "local_crops_number"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropAugmentation(**kwargs)


def test_bad_inputs_raise_type_errors(photos):
    aug = small_aug(0)
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(3, 40, 40))
    with pytest.raises(TypeError, match="PIL"):
        aug(np.asarray(photos[0]))
    with pytest.raises(ValueError, match="permute"):
        aug(torch.zeros(40, 40, 3, dtype=torch.uint8))


def test_documented_probabilities_and_reference_difference():
    assert (MultiCropAugmentation.global1_blur_p, MultiCropAugmentation.global2_blur_p) == (1.0, 0.1)
    assert MultiCropAugmentation.local_blur_p == 0.5 and MultiCropAugmentation.global2_solarize_p == 0.2
    doc = MultiCropAugmentation.__doc__
    assert "keep_p = 1 - p" in doc and "0.9" in doc


# --- empirical rates of the random ops -------------------------------------------------------------------


class Spy(torch.nn.Module):
    """Stands in for a photometric op: counts its calls and returns the image unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def steps(pipeline: v2.Compose) -> list:
    return list(pipeline.transforms)


def swap_in_spy(pipeline: v2.Compose, op_type: type) -> tuple[Spy, torch.nn.Module]:
    """Replace the op inside the pipeline's ``RandomApply([op_type(...)])`` by a spy; return (spy, original op)."""
    found = [s for s in steps(pipeline) if isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], op_type)]
    assert len(found) == 1, f"expected one RandomApply around {op_type.__name__}"
    original, spy = found[0].transforms[0], Spy()
    found[0].transforms[0] = spy
    return spy, original


def assert_rate(count: int, n: int, p: float) -> None:
    if p in (0.0, 1.0):
        assert count == n * p
        return
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4 * sd, f"{count}/{n} applications, expected p={p}"


def test_blur_rates_are_as_stated_not_inverted(photos):
    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=8, local_crops_size=8)
    image = torch.from_numpy(np.array(photos[0].resize((24, 16)))).permute(2, 0, 1).contiguous()
    n = 400
    torch.manual_seed(0)
    for pipeline, p in ((aug.global_transfo1, 1.0), (aug.global_transfo2, 0.1), (aug.local_transfo, 0.5)):
        spy, blur = swap_in_spy(pipeline, v2.GaussianBlur)
        assert list(blur.kernel_size) == [9, 9] and list(blur.sigma) == [0.1, 2.0]
        for _ in range(n):
            pipeline(image)
        assert_rate(spy.calls, n, p)


def test_solarize_only_on_global2_at_rate_0_2(photos):
    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=8, local_crops_size=8)
    for pipeline in (aug.global_transfo1, aug.local_transfo):
        assert not any("Solarize" in repr(s) for s in steps(pipeline))
    image = torch.from_numpy(np.array(photos[0].resize((24, 16)))).permute(2, 0, 1).contiguous()
    spy, solarize = swap_in_spy(aug.global_transfo2, v2.RandomSolarize)
    torch.manual_seed(0)
    n = 400
    for _ in range(n):
        aug.global_transfo2(image)
    assert_rate(spy.calls, n, 0.2)
    # The wrapped op inverts exactly the pixels >= 128 of a uint8 image.
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16)
    expected = torch.where(x >= 128, 255 - x, x)
    assert torch.equal(solarize(x), expected)


def test_colour_jitter_and_grayscale_rates(photos):
    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=8, local_crops_size=8)
    image = torch.from_numpy(np.array(photos[0].resize((24, 16)))).permute(2, 0, 1).contiguous()
    spy, jitter = swap_in_spy(aug.local_transfo, v2.ColorJitter)
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    torch.manual_seed(0)
    n = 400
    for _ in range(n):
        aug.local_transfo(image)
    assert_rate(spy.calls, n, 0.8)
    gray = [s for s in steps(aug.local_transfo) if isinstance(s, v2.RandomGrayscale)]
    assert len(gray) == 1 and gray[0].p == 0.2


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_separable_blur_matches_torchvision_gaussian_blur(sigma):
    """The two-pass blur used by the pipeline is torchvision's 9x9 Gaussian blur up to float rounding."""
    from torchvision.transforms.v2 import functional as TF

    from ssl_distill.data.augment import separable_gaussian_blur

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g)
    ref = TF.gaussian_blur(x, [9, 9], [sigma, sigma])
    out = separable_gaussian_blur(x, (9, 9), (sigma, sigma))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    xf = x.float() / 255
    torch.testing.assert_close(separable_gaussian_blur(xf, (9, 9), (sigma, sigma)),
                               TF.gaussian_blur(xf, [9, 9], [sigma, sigma]), rtol=0, atol=1e-5)


def test_pipeline_blur_is_a_gaussian_blur_with_the_recipe_parameters():
    from ssl_distill.data.augment import SeparableGaussianBlur

    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=32, local_crops_size=16)
    blurs = [s.transforms[0] for s in aug.global_transfo1.transforms if isinstance(s, v2.RandomApply)
             and isinstance(s.transforms[0], v2.GaussianBlur)]
    assert len(blurs) == 1 and isinstance(blurs[0], SeparableGaussianBlur)
    assert list(blurs[0].kernel_size) == [9, 9] and list(blurs[0].sigma) == [0.1, 2.0]
