"""Models: ViT backbones, attention kernels, DINO head."""

from __future__ import annotations

from ssl_distill.models.build import BACKBONE_NAMES, backbone_from_config, backbone_kwargs, build_backbone
from ssl_distill.models.heads import DINOHead, WeightNormLinear
from ssl_distill.models.vit import (
    VisionTransformer,
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
    "backbone_from_config",
    "backbone_kwargs",
    "build_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
