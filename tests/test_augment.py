"""MultiCropAugmentation on real photos: shapes, ranges, determinism, input kinds, the random-op rates, and the
OpenCV / fused kernels against torchvision's."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_distill.data import MultiCropAugmentation
from ssl_distill.data.augment import (
    ColorJitter,
    GaussianBlur,
    RandomResizedCrop,
    RandomRotation,
    ToFloatNormalize,
    to_rgb_uint8,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def small_aug(n_local: int = 3) -> MultiCropAugmentation:
    return MultiCropAugmentation(local_crops_number=n_local, global_crops_size=32, local_crops_size=16)


def all_crops(out: dict) -> list[torch.Tensor]:
    return out["global_crops"] + out["local_crops"]


def test_shapes_and_dtype_on_every_photo(photos):
    aug = small_aug(3)
    torch.manual_seed(0)
    for photo in photos:  # includes rectangular photos and the grayscale "camera"
        out = aug(photo)
        assert set(out) == {"global_crops", "local_crops"}
        assert len(out["global_crops"]) == 2
        assert len(out["local_crops"]) == 3
        for crop in out["global_crops"]:
            assert crop.shape == (3, 32, 32)
            assert crop.dtype == torch.float32
        for crop in out["local_crops"]:
            assert crop.shape == (3, 16, 16)
            assert crop.dtype == torch.float32


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
            assert torch.all(crop >= lo)
            assert torch.all(crop <= hi)
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
    assert out["local_crops"] == []
    assert len(out["global_crops"]) == 2


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
            assert torch.allclose(rgb01[0], rgb01[1], atol=1e-5)
            assert torch.allclose(rgb01[1], rgb01[2], atol=1e-5)


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
        ({"rotation_degrees": -5}, "rotation_degrees"),
        ({"rotation_degrees": 200}, "rotation_degrees"),
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
    assert MultiCropAugmentation.local_blur_p == 0.5
    assert MultiCropAugmentation.global2_solarize_p == 0.2
    doc = MultiCropAugmentation.__doc__
    assert "keep_p = 1 - p" in doc
    assert "0.9" in doc


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
        assert list(blur.kernel_size) == [9, 9]
        assert list(blur.sigma) == [0.1, 2.0]
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
    assert jitter.brightness == (0.6, 1.4)
    assert jitter.hue == (-0.1, 0.1)
    torch.manual_seed(0)
    n = 400
    for _ in range(n):
        aug.local_transfo(image)
    assert_rate(spy.calls, n, 0.8)
    gray = [s for s in steps(aug.local_transfo) if isinstance(s, v2.RandomGrayscale)]
    assert len(gray) == 1
    assert gray[0].p == 0.2


# --- the OpenCV / fused kernels against torchvision's ---------------------------------------------------


def photo_crops(photos, size: int = 96) -> list[torch.Tensor]:
    """One random resized crop per photo, channels-last uint8 as the pipeline makes them (camera is gray RGB)."""
    rrc = RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    torch.manual_seed(0)
    return [rrc(to_rgb_uint8(photo)) for photo in photos]


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.shape == b.shape
    assert a.dtype == b.dtype == torch.uint8
    return (a.int() - b.int()).abs()


def jitter_params(**factors) -> dict:
    params = dict(fn_idx=torch.arange(4), brightness_factor=None, contrast_factor=None, saturation_factor=None,
                  hue_factor=None)
    params.update(factors)
    return params


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_opencv_colour_jitter_matches_torchvision_per_op(photos, op):
    """Brightness and contrast are exact (look-up tables); saturation is within 1 level."""
    reference = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                 "saturation": TF.adjust_saturation}[op]
    jitter = ColorJitter(0.4, 0.4, 0.2, 0.1)
    for crop in photo_crops(photos):
        for inp in (crop, crop.contiguous()):  # channels-last and planar memory
            for factor in (0.6, 0.8, 0.95, 1.0, 1.1, 1.4):
                out = jitter.transform(inp, jitter_params(**{f"{op}_factor": factor}))
                diff = abs_diff(out, reference(inp, factor))
                if op == "saturation":
                    assert diff.max() <= 1, (factor, diff.max(), diff.float().mean())
                    assert diff.float().mean() < 0.1, (factor, diff.max(), diff.float().mean())
                else:
                    assert diff.max() == 0, (factor, diff.max())


def test_opencv_hue_is_torchvision_hue_quantised_to_8_bit_hsv(photos):
    """Hue shifts in OpenCV's 8-bit HSV (1/256 of a turn, as PIL's HSV in the DINOv2 reference): a few levels off
    torchvision's float HSV on some pixels, well below 1 on average. A gray image keeps its values."""
    jitter = ColorJitter(0.4, 0.4, 0.2, 0.1)
    for photo, crop in zip(photos, photo_crops(photos)):
        for factor in (-0.1, -0.03, 0.002, 0.05, 0.1):
            diff = abs_diff(jitter.transform(crop, jitter_params(hue_factor=factor)), TF.adjust_hue(crop, factor))
            assert diff.max() <= 8, (photo.info["name"], factor, diff.max())
            assert diff.float().mean() < 0.75, (photo.info["name"], factor, diff.max())
            if photo.mode == "L":
                assert diff.max() == 0
    crop = photo_crops(photos)[0]
    assert torch.equal(jitter.transform(crop, jitter_params(hue_factor=0.001)), crop)  # rounds to no shift


def test_opencv_colour_jitter_random_permutation_matches_torchvision(photos):
    """Same seed, same random order and factors (make_params is torchvision's): close to v2.ColorJitter."""
    crops = photo_crops(photos)
    for args, max_diff, mean_diff in (((0.4, 0.4, 0.2, 0.1), 16, 0.5), ((0.4, 0.4, 0.2), 3, 0.02)):
        ours, reference = ColorJitter(*args), v2.ColorJitter(*args)
        diffs = []
        for seed in range(8):
            for crop in crops:
                torch.manual_seed(seed)
                out = ours(crop)
                torch.manual_seed(seed)
                diffs.append(abs_diff(out, reference(crop)).flatten())
        diff = torch.cat(diffs).float()
        assert diff.max() <= max_diff, (args, diff.max(), diff.mean())
        assert diff.mean() < mean_diff, (args, diff.max(), diff.mean())


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_opencv_gaussian_blur_matches_torchvision(photos, sigma):
    blur = GaussianBlur(9, sigma=(0.1, 2.0))
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g)
    crops = photo_crops(photos)
    inputs = [noise, crops[0], crops[1].contiguous(), TF.rgb_to_grayscale(crops[2], 3), crops[3][:, 5:60, 2:90]]
    for inp in inputs:  # planar, channels-last, gray (stride-0 channels) and cropped-view memory
        out = blur.transform(inp, {"sigma": [sigma, sigma]})
        diff = abs_diff(out, TF.gaussian_blur(inp, [9, 9], [sigma, sigma]))
        assert diff.max() <= 1
        assert diff.float().mean() < 0.25  # OpenCV blurs uint8 with a fixed-point kernel


def test_non_uint8_inputs_fall_back_to_torchvision_exactly(photos):
    crop = photo_crops(photos)[0]
    pairs = [(ColorJitter(0.4, 0.4, 0.2, 0.1), v2.ColorJitter(0.4, 0.4, 0.2, 0.1)),
             (GaussianBlur(9, sigma=(0.1, 2.0)), v2.GaussianBlur(9, sigma=(0.1, 2.0))),
             (RandomResizedCrop(24, interpolation=v2.InterpolationMode.BICUBIC),
              v2.RandomResizedCrop(24, interpolation=v2.InterpolationMode.BICUBIC))]
    inputs = [crop.float() / 255, tv_tensors.Image(crop), crop.unsqueeze(0).expand(2, -1, -1, -1),
              Image.fromarray(crop.permute(1, 2, 0).numpy())]
    for ours, reference in pairs:
        for inp in inputs:
            torch.manual_seed(3)
            out = ours(inp)
            torch.manual_seed(3)
            expected = reference(inp)
            assert type(out) is type(expected)
            if isinstance(out, Image.Image):
                assert np.array_equal(np.asarray(out), np.asarray(expected))
            else:
                assert out.dtype == inp.dtype
                assert torch.equal(out, expected)


def test_random_resized_crop_is_bit_identical_and_channels_last(photos):
    ours = RandomResizedCrop(48, scale=(0.05, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    reference = v2.RandomResizedCrop(48, scale=(0.05, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                     antialias=True)
    for photo in photos:
        image = to_rgb_uint8(photo)
        assert image.permute(1, 2, 0).is_contiguous()  # pil_to_tensor: a CHW view of HWC memory
        for seed in range(3):
            torch.manual_seed(seed)
            out = ours(image)
            torch.manual_seed(seed)
            assert torch.equal(out, reference(image))
            assert out.dtype == torch.uint8
            assert out.permute(1, 2, 0).is_contiguous()


def test_uint8_tensor_inputs_become_channels_last_without_changing_values(photos):
    hwc = torch.from_numpy(np.array(photos[0]))
    planar = hwc.permute(2, 0, 1).contiguous()
    out = to_rgb_uint8(planar)
    assert torch.equal(out, planar)
    assert out.permute(1, 2, 0).is_contiguous()
    channels_last = hwc.permute(2, 0, 1)
    assert to_rgb_uint8(channels_last).data_ptr() == channels_last.data_ptr()  # no copy


def test_fused_to_float_normalize_matches_todtype_and_normalize(photos):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    fused = ToFloatNormalize(mean, std)
    two_steps = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    for inp in (photo_crops(photos)[0], photo_crops(photos)[1].contiguous()):
        out = fused(inp)
        assert out.dtype == torch.float32
        assert out.shape == inp.shape
        assert out.is_contiguous()
        torch.testing.assert_close(out, two_steps(inp), rtol=0, atol=1e-5)
    x = torch.rand(3, 8, 8)
    assert torch.equal(fused(x), v2.Normalize(mean, std)(x))  # float input: plain Normalize


def test_pipeline_uses_the_opencv_ops_single_threaded(photos):
    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=32, local_crops_size=16)
    ops = [s.transforms[0] for s in aug.global_transfo1.transforms if isinstance(s, v2.RandomApply)]
    blurs = [op for op in ops if isinstance(op, v2.GaussianBlur)]
    jitters = [op for op in ops if isinstance(op, v2.ColorJitter)]
    assert len(blurs) == 1
    assert isinstance(blurs[0], GaussianBlur)
    assert list(blurs[0].kernel_size) == [9, 9]
    assert list(blurs[0].sigma) == [0.1, 2.0]
    assert len(jitters) == 1
    assert isinstance(jitters[0], ColorJitter)
    assert isinstance(aug.global_transfo1.transforms[0], RandomResizedCrop)
    torch.manual_seed(0)
    for crop in all_crops(aug(photos[0])):
        assert crop.is_contiguous()
    assert cv2.getNumThreads() == 1


def test_probabilities_as_arguments_change_the_rates(photos):
    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=8, local_crops_size=8, flip_p=0.0,
                                global1_blur_p=0.0, local_blur_p=1.0, global2_solarize_p=0.0, color_jitter_p=0.25)
    assert MultiCropAugmentation.global1_blur_p == 1.0  # the class default is untouched
    image = torch.from_numpy(np.array(photos[0].resize((24, 16)))).permute(2, 0, 1).contiguous()
    n = 400
    torch.manual_seed(0)
    for pipeline, p in ((aug.global_transfo1, 0.0), (aug.local_transfo, 1.0)):
        spy, _ = swap_in_spy(pipeline, v2.GaussianBlur)
        for _ in range(n):
            pipeline(image)
        assert_rate(spy.calls, n, p)
    spy, _ = swap_in_spy(aug.global_transfo1, v2.ColorJitter)
    for _ in range(n):
        aug.global_transfo1(image)
    assert_rate(spy.calls, n, 0.25)
    assert not any("Solarize" in repr(s) for s in steps(aug.global_transfo2))
    flips = [s for s in steps(aug.global_transfo2) if isinstance(s, v2.RandomHorizontalFlip)]
    assert [f.p for f in flips] == [0.0]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"flip_p": 1.5}, ValueError, "flip_p must be a probability"),
    ({"local_blur_p": True}, ValueError, "local_blur_p must be a probability"),
    ({"blur_p": 0.5}, TypeError, "unknown augmentation probability 'blur_p'"),
])
def test_bad_probabilities_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiCropAugmentation(**kwargs)


def test_config_probabilities_reach_the_training_augmentation(photo_folder):
    from ssl_distill.config import ConfigError, load_config
    from ssl_distill.data.pipeline import build_train_dataset, build_train_loader

    cfg = load_config(None, [f"train.dataset_path={photo_folder}", "crops.global_crops_size=32",
                             "crops.local_crops_size=16", "student.patch_size=8", "train.num_workers=0",
                             "crops.horizontal_flip_p=0", "crops.blur_p=[0,0.25,0]", "crops.solarize_p=0",
                             "crops.color_jitter_p=0.5", "crops.grayscale_p=0", "crops.rotation_degrees=12.5"])
    aug = build_train_loader(cfg, build_train_dataset(cfg), 0, pin_memory=False).dataset.augmentation
    assert aug.rotation_degrees == 12.5
    assert sum(isinstance(step, RandomRotation) for step in steps(aug.local_transfo)) == 1
    assert (aug.flip_p, aug.global1_blur_p, aug.global2_blur_p, aug.local_blur_p) == (0.0, 0.0, 0.25, 0.0)
    assert (aug.global2_solarize_p, aug.color_jitter_p, aug.grayscale_p) == (0.0, 0.5, 0.0)
    with pytest.raises(ConfigError, match="crops.blur_p"):
        load_config(None, ["crops.blur_p=[1.0,0.5]"])
    with pytest.raises(ConfigError, match="crops.solarize_p"):
        load_config(None, ["crops.solarize_p=2"])
    with pytest.raises(ConfigError, match="crops.rotation_degrees"):
        load_config(None, ["crops.rotation_degrees=-1"])


@pytest.mark.parametrize("angle", [7.0, -30.0, 90.0])
def test_opencv_rotation_matches_torchvision(photos, angle):
    """Same angle convention and centre as torchvision: equal away from the filled corners, whose anti-aliased edge
    is drawn differently; the corners are filled with black as there."""
    crops = photo_crops(photos, size=64)
    for inp in (crops[0], crops[1].contiguous()):  # channels-last and planar memory
        rotate = RandomRotation((angle, angle), interpolation=v2.InterpolationMode.BILINEAR)
        out = rotate(inp)
        ref = TF.rotate(inp.contiguous(), angle, interpolation=v2.InterpolationMode.BILINEAR)
        assert out.shape == inp.shape and out.dtype == torch.uint8
        assert abs_diff(out, ref)[:, 20:44, 20:44].max() <= 1
        assert abs_diff(out, ref).float().mean() < 2.0
        if angle % 90:
            assert out[:, 0, 0].tolist() == [0, 0, 0]  # a corner rotated in from outside the crop


def test_rotation_is_off_by_default_and_drawn_per_crop(photos):
    assert not any(isinstance(step, RandomRotation) for step in steps(small_aug().local_transfo))
    plain = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16, flip_p=0,
                                  color_jitter_p=0, grayscale_p=0, global1_blur_p=0, global2_blur_p=0, local_blur_p=0,
                                  global2_solarize_p=0)
    rotating = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16, flip_p=0,
                                     color_jitter_p=0, grayscale_p=0, global1_blur_p=0, global2_blur_p=0,
                                     local_blur_p=0, global2_solarize_p=0, rotation_degrees=20)
    image = photos[0]
    torch.manual_seed(0)
    ref = all_crops(plain(image))
    torch.manual_seed(0)
    rotated = all_crops(rotating(image))
    assert all(a.shape == b.shape for a, b in zip(ref, rotated))
    assert all(not torch.equal(a, b) for a, b in zip(ref, rotated))
