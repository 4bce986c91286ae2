"""Models: ViT backbones (ours and timm's, behind one contract), attention kernels, DINO head.

Attributes load lazily (PEP 562), so ``ssl_distill.models.names`` — the torch-free table the config validates
against — imports without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "BACKBONE_NAMES": "build", "backbone_from_config": "build", "backbone_kwargs": "build", "build_backbone": "build",
    "Backbone": "contract", "DINOHead": "heads", "WeightNormLinear": "heads", "VisionTransformer": "vit",
    "vit_base": "vit", "vit_giant2": "vit", "vit_large": "vit", "vit_small": "vit", "vit_tiny": "vit",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ssl_distill.models' has no attribute {name!r}")
    value = getattr(import_module(f"ssl_distill.models.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
