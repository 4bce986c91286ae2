"""Resampling learned grids: position embeddings (as the reference does it) and patch-token maps.

:func:`interpolate_pos_embed` is DINOv2's bicubic resampling of a square position grid, with its
``interpolate_offset`` (0.1 by default: the scale factor is ``(new + 0.1) / old``) and optional antialiasing; the
ViT uses it for inputs of other sizes and continued pretraining uses it to fit released weights (a 37x37 grid at
518 px) to the configured crop size. :func:`resize_token_grid` moves patch tokens from one grid to another
(distillation between different patch sizes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolate_pos_embed(pos_embed: Tensor, rows: int, cols: int, offset: float = 0.1,
                          antialias: bool = False) -> Tensor:
    """``(1, 1 + M*M, D)`` (class position first, then a square ``M x M`` grid) -> ``(1, 1 + rows*cols, D)``.

    Bicubic, computed in fp32 and returned in the input dtype; the identity when the grid already fits.
    """
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the position embedding's {n} patch positions do not form a square grid")
    if (rows, cols) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    kwargs: dict[str, Any] = {}
    # float()/int(): under tracing (fvcore's FLOP count) the sizes may be 0-dim tensors, which F.interpolate refuses
    if offset:  # the small offset avoids floating-point error in the interpolation (DINO / DINOv2)
        kwargs["scale_factor"] = (float(rows + offset) / side, float(cols + offset) / side)
    else:
        kwargs["size"] = (int(rows), int(cols))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise AssertionError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, not {(rows, cols)}")
    patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1].float(), patches), dim=1).to(pos_embed.dtype)


def resize_token_grid(tokens: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Patch tokens ``(B, H*W, D)`` on an ``H x W`` grid -> ``(B, H'*W', D)`` on ``new_grid``, bilinearly
    (align_corners=False: each token is the value at its patch's centre). The identity when the grids match."""
    if tuple(grid) == tuple(new_grid):
        return tokens
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    maps = tokens.transpose(1, 2).reshape(b, d, *grid)
    maps = F.interpolate(maps.float(), size=tuple(new_grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2).to(tokens.dtype)
