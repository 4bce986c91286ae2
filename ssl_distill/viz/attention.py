"""CLS-attention maps of a ViT's last block, as in DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised
Vision Transformers", Fig. 1 and ``visualize_attention.py``).

The CLS token's attention over the patch tokens in the last block, one map per head, often segments the main
object without any supervision. Register tokens (Darcet et al., 2024) are skipped: the maps cover patches only.

* :func:`cls_attention_maps`: image ``(3, H, W)`` -> maps ``(heads, H / p, W / p)`` (``p`` = patch size);
* :func:`threshold_attention`: the DINO mask that keeps the top ``threshold`` fraction of each map's mass;
* :func:`save_attention_figure`: input image, one heat map per head and their mean (+ masks) in one PNG;
* :func:`collect_image_paths`, :func:`load_image`, :func:`visualize_images`: files in, ``<stem>_attention.png`` out.

Figures are drawn with Pillow and a small numpy colour map (viridis), so the core install can visualise.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms import functional as TF

from ssl_distill.data.datasets import IMG_EXTENSIONS, BrokenImageError, is_image_file, load_rgb
from ssl_distill.eval.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_distill.fileio import atomic_open

logger = logging.getLogger(__name__)

__all__ = [
    "PADDING",
    "cls_attention_maps",
    "collect_image_paths",
    "colorize",
    "denormalize",
    "load_image",
    "save_attention_figure",
    "threshold_attention",
    "visualize_images",
]

PADDING = 4  # pixels between (and around) the tiles of a figure
MAX_COLUMNS = 7  # tiles per row before the figure wraps (image + 6 heads of a ViT-S + mean = 8: two rows)
_BACKGROUND = (255, 255, 255)
_OUTSIDE_MASK = 0.25  # brightness of the image outside a threshold mask

# viridis (matplotlib) sampled at 0, 1/8, ..., 1; luminance increases monotonically along it.
_VIRIDIS_ANCHORS = np.array(
    [(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
     (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37)], dtype=np.float64,
)
_X = np.linspace(0.0, 1.0, 256)
_ANCHOR_X = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
VIRIDIS_LUT = np.stack([np.interp(_X, _ANCHOR_X, _VIRIDIS_ANCHORS[:, c]) for c in range(3)], 1).round().astype(
    np.uint8
)  # (256, 3)


# ------------------------------------------------------------------------------------------------ maps


@torch.no_grad()
def cls_attention_maps(model: torch.nn.Module, image: Tensor) -> Tensor:
    """The last block's CLS-to-patch attention, per head, on the patch grid.

    Args:
        model: a :class:`~ssl_distill.models.VisionTransformer` (anything with ``get_last_self_attention``,
            ``patch_size`` and ``num_register_tokens``).
        image: a normalised image ``(3, H, W)`` or ``(1, 3, H, W)``; ``H`` and ``W`` multiples of the patch size
            (rectangular is fine: the position embedding is interpolated).

    Returns:
        float32 ``(heads, H // p, W // p)`` on the image's device: row 0 (CLS) of each head's softmax attention,
        patch columns only (registers skipped), so each map sums to ``1 - attention to CLS and registers``.
    """
    x = image.unsqueeze(0) if image.dim() == 3 else image
    p = int(model.patch_size)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if x.shape[-2] % p or x.shape[-1] % p or h == 0 or w == 0:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a (nonzero) multiple of the patch size {p}")
    attn = model.get_last_self_attention(x)  # (1, heads, T, T), T = 1 + R + h * w
    first_patch = 1 + int(model.num_register_tokens)
    cls_row = attn[0, :, 0, first_patch:].float()  # (heads, h * w), patches in row-major order
    return cls_row.reshape(cls_row.shape[0], h, w)


def threshold_attention(maps: Tensor, threshold: float) -> Tensor:
    """DINO's mask: per map, the fewest highest-attention patches that together hold >= ``threshold`` of its mass.

    Args:
        maps: non-negative ``(heads, h, w)`` (or any ``(..., h, w)``).
        threshold: fraction of the attention mass to keep, in ``(0, 1]`` (DINO's figures use 0.6).

    Returns:
        bool ``(heads, h, w)``: True where a patch is kept. Every kept patch has at least the attention of every
        dropped one; the kept mass is >= ``threshold``, and dropping the smallest kept patch would go below it.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = maps.flatten(-2).double()
    values, order = torch.sort(flat, dim=-1)  # ascending
    mass = values.cumsum(-1) / values.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    keep_sorted = mass > 1.0 - threshold  # dropped: the low tail holding at most 1 - threshold of the mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


# ---------------------------------------------------------------------------------------------- images


def denormalize(image: Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation: ``(3, H, W)`` float tensor -> ``(H, W, 3)`` uint8 RGB array."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def colorize(attention_map: Tensor, size: tuple[int, int]) -> np.ndarray:
    """A map ``(h, w)`` -> viridis heat map ``(H, W, 3)`` uint8, min-max scaled, each patch a ``(H/h, W/w)`` block
    (nearest upsampling, as DINO's figures)."""
    m = attention_map.detach().float().cpu()
    span = float(m.max() - m.min())
    scaled = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
    idx = (scaled * 255).round().long().numpy()
    return _upsample(VIRIDIS_LUT[idx], size)


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of an ``(h, w, ...)`` array to ``size = (H, W)``."""
    rows = np.arange(size[0]) * grid.shape[0] // size[0]
    cols = np.arange(size[1]) * grid.shape[1] // size[1]
    return grid[rows][:, cols]


def _mask_overlay(rgb: np.ndarray, mask: Tensor) -> np.ndarray:
    """The image ``(H, W, 3)`` with the patches outside ``mask`` ``(h, w)`` darkened."""
    keep = _upsample(mask.cpu().numpy(), rgb.shape[:2])[..., None]
    return np.where(keep, rgb, (rgb * _OUTSIDE_MASK).astype(np.uint8))


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner of a tile (white on black)."""
    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))
    return np.asarray(img)


def _grid(cells: list[np.ndarray], columns: int) -> Image.Image:
    """Equal-sized cells ``(Hc, Wc, 3)`` in rows of ``columns``, ``PADDING`` pixels apart and around."""
    hc, wc = cells[0].shape[:2]
    rows = math.ceil(len(cells) / columns)
    canvas = np.full((rows * hc + (rows + 1) * PADDING, columns * wc + (columns + 1) * PADDING, 3), _BACKGROUND,
                     dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        y, x = PADDING + r * (hc + PADDING), PADDING + c * (wc + PADDING)
        canvas[y:y + hc, x:x + wc] = cell
    return Image.fromarray(canvas)


def save_attention_figure(
    image: Tensor, maps: Tensor, path: str | os.PathLike, threshold: float | None = None,
    max_columns: int = MAX_COLUMNS,
) -> Path:
    """Write one PNG: the input image, a heat map per head and the head mean (+ their threshold masks).

    Args:
        image: the normalised model input ``(3, H, W)`` (ImageNet mean/std), shown de-normalised.
        maps: attention maps ``(heads, h, w)`` from :func:`cls_attention_maps`; each is upsampled to ``(H, W)``.
        path: output ``.png``, written atomically.
        threshold: when set, each cell gets a second tile below it: the image with the patches outside
            :func:`threshold_attention` darkened (the image cell gets a blank one).
        max_columns: cells per row before wrapping.

    Layout: cells ``[image, head 0, ..., head n-1, mean]``, each ``(H, W)`` (``(2H + PADDING, W)`` with a
    threshold), ``min(n + 2, max_columns)`` per row, ``PADDING`` white pixels between and around them.
    """
    size = (int(image.shape[-2]), int(image.shape[-1]))
    rgb = denormalize(image)
    stack = torch.cat([maps, maps.mean(0, keepdim=True)])  # (heads + 1, h, w)
    names = [f"head {i}" for i in range(maps.shape[0])] + ["mean"]
    cells = [rgb] + [_label(colorize(m, size), name) for m, name in zip(stack, names)]
    if threshold is not None:
        masks = threshold_attention(stack, threshold)
        below = [np.full_like(rgb, 255)] + [_label(_mask_overlay(rgb, m), f"top {threshold:.0%}") for m in masks]
        gap = np.full((PADDING, size[1], 3), _BACKGROUND, dtype=np.uint8)
        cells = [np.concatenate([top, gap, bottom]) for top, bottom in zip(cells, below)]
    figure = _grid(cells, max(1, min(len(cells), max_columns)))
    with atomic_open(path, "wb") as f:
        figure.save(f, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------------------------- files


def collect_image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their image files (non-recursive, sorted, hidden files skipped).

    Raises ``FileNotFoundError`` for a missing path, a folder without images, or output names that would collide.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_image_file(f) and not f.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"image folder '{p}' holds no image files ({', '.join(IMG_EXTENSIONS)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            hint = " (key=value overrides go before --images)" if "=" in str(item) else ""
            raise FileNotFoundError(f"image '{p}' does not exist{hint}; pass image files or folders of images")
    firsts: dict[Path, Path] = {}
    for p in paths:
        firsts.setdefault(p.resolve(), p)  # a file given twice (folder + file) is drawn once
    unique = list(firsts.values())
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise FileNotFoundError(f"images '{stems[p.stem]}' and '{p}' would both be written to "
                                    f"{p.stem}_attention.png; rename one or visualise them separately")
        stems[p.stem] = p
    return unique


def load_image(path: str | os.PathLike, image_size: int, patch_size: int) -> Tensor:
    """Read an image file -> normalised ``(3, H, W)``: shorter side resized to ``image_size`` (bicubic, aspect
    kept), then centre-cropped to multiples of ``patch_size``. Raises :class:`BrokenImageError` if unreadable."""
    try:
        img = load_rgb(str(path))
    except Exception as err:
        raise BrokenImageError(f"cannot read image '{path}' ({type(err).__name__}: {err}); pass a readable image "
                               "file (JPEG, PNG, ...)") from None
    img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC)
    w, h = img.size
    img = TF.center_crop(img, [h - h % patch_size, w - w % patch_size])
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def visualize_images(
    model: torch.nn.Module, paths: Sequence[Path], output_dir: str | os.PathLike, image_size: int = 480,
    threshold: float | None = 0.6, device: str | torch.device = "cpu",
) -> list[Path]:
    """Write ``output_dir/<stem>_attention.png`` for each image file (see :func:`save_attention_figure`).

    Images are read one at a time (:func:`load_image`); an unreadable one raises :class:`BrokenImageError`.
    """
    if image_size < model.patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch size {model.patch_size}")
    model = model.to(device).eval()
    written = []
    for path in paths:
        image = load_image(path, image_size, model.patch_size)
        maps = cls_attention_maps(model, image.to(device))
        out = save_attention_figure(image, maps.cpu(), Path(output_dir) / f"{path.stem}_attention.png", threshold)
        logger.info("%s: %d heads on a %dx%d patch grid -> %s", path, *maps.shape, out)
        written.append(out)
    return written
