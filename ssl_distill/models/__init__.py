"""Models: ViT backbones, attention kernels, DINO head."""

from __future__ import annotations

from ssl_distill.models.heads import DINOHead, WeightNormLinear
from ssl_distill.models.vit import (
    BACKBONE_NAMES,
    VisionTransformer,
    build_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "BACKBONE_NAMES",
    "DINOHead",
    "VisionTransformer",
    "WeightNormLinear",
    "build_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
