"""CLS-attention maps (DINO, Caron et al. 2021): maps vs an independent attention computation, the threshold mask,
the PNG figure, and `ssl-distill visualize` end to end on real photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cli_utils import one_line_error as _error
from PIL import Image

from ssl_distill.cli import main
from ssl_distill.config import config_to_yaml, load_config
from ssl_distill.eval.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_distill.models import backbone_from_config, build_backbone
from ssl_distill.train.checkpoint import export_backbone, save_checkpoint
from ssl_distill.viz.attention import (
    PADDING,
    cls_attention_maps,
    load_image,
    save_attention_figure,
    threshold_attention,
)

TINY = "configs/tiny_cpu.yaml"  # vit_tiny (3 heads), patch 8
LABEL_BOX = (20, 50)  # tile corner (rows, cols) that may hold a text label


def _model(registers: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, init_values=1.0,
                          num_register_tokens=registers, attn_impl="sdpa").eval()


def _reference_maps(model, x: torch.Tensor) -> torch.Tensor:
    """CLS row of the last block's softmax(q k^T / sqrt(d)), written out by hand: (heads, h, w)."""
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x[None])
        for blk in model.blocks[:-1]:
            tokens = blk(tokens)
        last = model.blocks[-1]
        y = last.norm1(tokens)[0]  # (T, D)
        heads, dim = last.attn.num_heads, y.shape[-1]
        q, k, _ = last.attn.qkv(y).reshape(-1, 3, heads, dim // heads).permute(1, 2, 0, 3)  # (heads, T, d) each
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)  # (heads, T, T)
    p, first = model.patch_size, 1 + model.num_register_tokens
    h, w = x.shape[-2] // p, x.shape[-1] // p
    out = torch.empty(heads, h, w)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = attn[:, 0, first + i * w + j]
    return out


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, photos):
    """The real photos as files: china.jpg (640x427), chelsea.png (451x300), camera.png (grayscale 512x512)."""
    root = tmp_path_factory.mktemp("viz_photos")
    by_name = {im.info["name"]: im for im in photos}
    by_name["china"].save(root / "china.jpg", quality=92)
    by_name["chelsea"].save(root / "chelsea.png")
    by_name["camera"].save(root / "camera.png")
    (root / "notes.txt").write_text("not an image")  # folders are filtered by extension
    return root


def test_load_image_resizes_shorter_side_and_crops_to_patches(photo_files):
    x = load_image(photo_files / "china.jpg", 64, 8)  # 640x427 -> 95x64 -> crop 88x64
    assert x.shape == (3, 64, 88)
    rgb = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert 0.0 <= rgb.min()
    assert rgb.max() <= 1.0
    assert rgb.std() > 0.05  # a real photo, normalised with ImageNet
    assert load_image(photo_files / "camera.png", 60, 14).shape == (3, 56, 56)  # grayscale -> RGB, 60 -> 56


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(48, 48), (40, 72)])
def test_maps_are_the_cls_row_over_patches(photo_files, registers, size):
    model = _model(registers)
    x = load_image(photo_files / "chelsea.png", max(size), 8)[:, : size[0], : size[1]]
    maps = cls_attention_maps(model, x)
    assert maps.shape == (3, size[0] // 8, size[1] // 8)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, _reference_maps(model, x), atol=1e-5, rtol=1e-4)
    last = model.get_last_self_attention(x[None])[0, :, 0]  # (heads, T)
    torch.testing.assert_close(maps.flatten(1), last[:, 1 + registers:])  # registers skipped, patches in order
    assert torch.all(maps.sum((1, 2)) < 1.0)
    assert torch.allclose(maps.sum((1, 2)) + last[:, : 1 + registers].sum(1), torch.ones(3))


def test_maps_reject_sizes_that_are_not_patch_multiples():
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        cls_attention_maps(_model(), torch.zeros(3, 40, 44))


def test_threshold_keeps_the_stated_attention_mass(photo_files):
    small = torch.tensor([[[0.05, 0.5], [0.3, 0.15]]])
    assert threshold_attention(small, 0.6).tolist() == [[[False, True], [True, False]]]
    assert threshold_attention(small, 0.45).tolist() == [[[False, True], [False, False]]]
    assert threshold_attention(small, 1.0).all()
    maps = cls_attention_maps(_model(), load_image(photo_files / "china.jpg", 64, 8))  # (3, 8, 11)
    peaked = torch.softmax(torch.randn(2, 8, 11, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    for m in (*maps, *peaked):
        for t in (0.1, 0.6, 0.9):
            keep = threshold_attention(m[None], t)[0]
            kept, total = m[keep].sum(), m.sum()
            assert kept >= t * total - 1e-6, (t, kept / total)
            assert kept - m[keep].min() < t * total  # the fewest patches: one less would fall short
            assert m[keep].min() >= m[~keep].max()  # highest attention first
    with pytest.raises(ValueError, match="threshold"):
        threshold_attention(small, 0.0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _blocks(tile: np.ndarray, p: int):
    """(i, j, block) for each p x p patch block of a tile that lies outside the label corner."""
    for i in range(tile.shape[0] // p):
        for j in range(tile.shape[1] // p):
            if not (i * p <= LABEL_BOX[0] and j * p <= LABEL_BOX[1]):
                yield i, j, tile[i * p:(i + 1) * p, j * p:(j + 1) * p]


def test_figure_layout_and_pixels(tmp_path, photo_files):
    x = load_image(photo_files / "china.jpg", 64, 8)  # (3, 64, 88)
    maps = cls_attention_maps(_model(), x)  # (3, 8, 11)
    H, W, cells = 64, 88, 3 + 2  # image, 3 heads, mean
    path = save_attention_figure(x, maps, tmp_path / "fig.png")
    fig = np.asarray(Image.open(path))
    assert fig.shape == (H + 2 * PADDING, cells * W + (cells + 1) * PADDING, 3)
    image_tile = fig[PADDING:PADDING + H, PADDING:PADDING + W].astype(int)
    expected = (x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
    assert np.abs(image_tile - expected.permute(1, 2, 0).numpy()).max() <= 1  # de-normalised input
    for c, m in enumerate([*maps, maps.mean(0)], start=1):
        x0 = PADDING + c * (W + PADDING)
        tile = fig[PADDING:PADDING + H, x0:x0 + W]
        values, lum = [], []
        for i, j, block in _blocks(tile, 8):
            assert (block == block[0, 0]).all()  # nearest upsampling: one colour per patch
            values.append(float(m[i, j]))
            lum.append(_luminance(block[0, 0]))
        order = np.argsort(values, kind="stable")
        assert np.all(np.diff(np.asarray(lum)[order]) >= 0)  # brighter = more attention
        assert max(lum) - min(lum) > 100  # min-max scaled over the colour map

    wrapped = np.asarray(Image.open(save_attention_figure(x, maps, tmp_path / "wrap.png", 0.6, max_columns=2)))
    assert wrapped.shape == (3 * (2 * H + PADDING) + 4 * PADDING, 2 * W + 3 * PADDING, 3)  # 5 cells, 2 per row
    keep = threshold_attention(maps, 0.6)[0]  # head 0: second cell, its mask tile below the heat map
    y0, x0 = PADDING + H + PADDING, PADDING + W + PADDING
    mask_tile = wrapped[y0:y0 + H, x0:x0 + W].astype(int)
    for i, j, block in _blocks(mask_tile, 8):
        original = image_tile[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
        if keep[i, j]:
            assert np.array_equal(block, original)
        else:
            assert np.abs(block - original * 0.25).max() <= 1  # darkened outside the mask


def test_cli_random_weights_on_files_and_folders(tmp_path, photo_files, capsys):
    out = tmp_path / "out"
    rc = main(["visualize", "--pretrained-weights", "random", "--config-file", TINY, "--images", str(photo_files),
               str(photo_files / "china.jpg"), "--output-dir", str(out), "--image-size", "64", "--device", "cpu"])
    assert rc == 0
    assert "wrote 3 attention figure(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["camera_attention.png", "chelsea_attention.png",
                                                      "china_attention.png"]
    # threshold 0.6 by default: two tiles per cell; 5 cells (image, 3 heads, mean) in one row
    for stem, (h, w) in {"china": (64, 88), "chelsea": (64, 96), "camera": (64, 64)}.items():
        with Image.open(out / f"{stem}_attention.png") as im:
            assert im.format == "PNG"
            assert im.mode == "RGB"
            assert im.size == (5 * w + 6 * PADDING, 2 * h + 3 * PADDING), stem
    main(["visualize", "--pretrained-weights", "random", "--config-file", TINY, "--images",
          str(photo_files / "chelsea.png"), "--output-dir", str(out), "--image-size", "64", "--threshold", "0"])
    assert Image.open(out / "chelsea_attention.png").size == (5 * 96 + 6 * PADDING, 64 + 2 * PADDING)


def test_cli_with_checkpoint_and_exported_backbone(tmp_path, photo_files):
    torch.manual_seed(1)
    cfg = load_config(TINY, ["student.num_register_tokens=2"])
    reference = backbone_from_config(cfg).eval()  # the teacher, with its 2 registers
    sd = reference.state_dict()
    model = {f"teacher.backbone.{k}": v for k, v in sd.items()}
    model.update({f"student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()})
    ckpt = save_checkpoint(tmp_path / "run", {"iteration": 3, "model": model, "config": config_to_yaml(cfg)})
    image = ["--images", str(photo_files / "chelsea.png"), "--image-size", "48", "--threshold", "0.5",
             "--device", "cpu"]
    assert main(["visualize", "--pretrained-weights", str(ckpt), *image, "--output-dir", str(tmp_path / "a")]) == 0

    x = load_image(photo_files / "chelsea.png", 48, 8)
    expected = save_attention_figure(x, cls_attention_maps(reference, x), tmp_path / "expected.png", 0.5)
    got = np.asarray(Image.open(tmp_path / "a" / "chelsea_attention.png"))
    assert np.array_equal(got, np.asarray(Image.open(expected)))

    backbone = export_backbone(ckpt, tmp_path / "backbone.pth")
    argv = ["visualize", "--pretrained-weights", str(backbone), "--config-file", TINY, "student.num_register_tokens=2",
            *image, "--output-dir", str(tmp_path / "b")]
    assert main(argv) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "chelsea_attention.png")), got)


def test_cli_errors_are_one_line(tmp_path, photo_files, capsys):
    base = ["visualize", "--pretrained-weights", "random", "--config-file", TINY, "--output-dir", str(tmp_path / "o"),
            "--image-size", "32"]
    assert "does not exist" in _error(capsys, [*base, "--images", str(tmp_path / "nope.jpg")])
    assert "go before --images" in _error(capsys, [*base, "--images", str(photo_files / "china.jpg"), "x.y=1"])
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in _error(capsys, [*base, "--images", str(tmp_path / "empty")])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    msg = _error(capsys, [*base, "--images", str(tmp_path / "broken.jpg")])
    assert "cannot read image" in msg
    assert "broken.jpg" in msg
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "china.png").write_bytes((photo_files / "chelsea.png").read_bytes())
    msg = _error(capsys, [*base, "--images", str(photo_files / "china.jpg"), str(tmp_path / "dup")])
    assert "china_attention.png" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    bad_weights = [a if a != "random" else str(junk) for a in base]
    assert "cannot read weights file" in _error(capsys, [*bad_weights, "--images", str(photo_files)])
    assert "smaller than the patch size 8" in _error(capsys, [*base[:-1], "4", "--images", str(photo_files)])
    assert "--threshold" in _error(capsys, [*base, "--threshold", "1.5", "--images", str(photo_files)])
    assert not (tmp_path / "o").exists()  # nothing written on errors
