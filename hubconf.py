"""torch.hub entry points with the names and arguments of facebookresearch/dinov2's ``hubconf.py``.

>>> import torch
>>> model = torch.hub.load("/path/to/ssl_distill", "dinov2_vits14", source="local")
>>> model = torch.hub.load("/path/to/ssl_distill", "dinov2_vitb14_reg", source="local", pretrained=False)
>>> clf = torch.hub.load("/path/to/ssl_distill", "dinov2_vits14_lc", source="local", layers=1)  # ImageNet-1k logits

Backbones ``dinov2_vit{s,b,l,g}14{,_reg}`` take ``pretrained`` (default True), ``weights`` (``"LVD142M"`` = the
published file, or a path / URL), ``block_chunks`` (ignored: it only groups blocks for FSDP in the reference code
and changes neither the model nor its weights) and the reference architecture arguments. The linear classifiers
``dinov2_vit{s,b,l,g}14{,_reg}_lc`` add ``layers`` (1 or 4, default 4) and take ``weights="IMAGENET1K"`` (the
published head) or a head file / URL (e.g. ``best_linear_head.pth`` from ``ssl-distill eval-linear``);
``backbone_weights=`` replaces the backbone's. See :mod:`ssl_distill.hub.entrypoints` and MODEL_ZOO.md (depth heads
and the text-aligned model are not provided).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep typing names out of the module namespace: torch.hub.list() shows every public callable
    from collections.abc import Callable
    from typing import Any

dependencies = ["torch"]


def _backbone(name: str) -> Callable[..., Any]:
    def entry(*, pretrained: bool = True, weights: Any = "LVD142M", **kwargs: Any) -> Any:
        from ssl_distill.hub.entrypoints import backbone

        return backbone(name, pretrained=pretrained, weights=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"DINOv2 backbone ``{name}`` (see MODEL_ZOO.md), optionally pretrained on LVD-142M. Arguments "
                     "as in facebookresearch/dinov2: pretrained, weights ('LVD142M' or a path / URL), architecture "
                     "overrides; block_chunks is accepted and ignored (FSDP grouping only, no effect on the model).")
    return entry


def _classifier(name: str) -> Callable[..., Any]:
    def entry(*, layers: int = 4, pretrained: bool = True, weights: Any = "IMAGENET1K", **kwargs: Any) -> Any:
        from ssl_distill.hub.entrypoints import classifier

        return classifier(name, layers=layers, pretrained=pretrained, weights=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = f"{name}_lc"
    entry.__doc__ = (f"Linear classifier (1 or 4 layers) on the DINOv2 backbone ``{name}``, trained on ImageNet-1k. "
                     "weights: 'IMAGENET1K' (the published head) or a head file / URL (e.g. from `ssl-distill "
                     "eval-linear`); backbone_weights replaces the backbone's; block_chunks is ignored.")
    return entry


dinov2_vits14 = _backbone("dinov2_vits14")
dinov2_vits14_reg = _backbone("dinov2_vits14_reg")
dinov2_vitb14 = _backbone("dinov2_vitb14")
dinov2_vitb14_reg = _backbone("dinov2_vitb14_reg")
dinov2_vitl14 = _backbone("dinov2_vitl14")
dinov2_vitl14_reg = _backbone("dinov2_vitl14_reg")
dinov2_vitg14 = _backbone("dinov2_vitg14")
dinov2_vitg14_reg = _backbone("dinov2_vitg14_reg")

dinov2_vits14_lc = _classifier("dinov2_vits14")
dinov2_vits14_reg_lc = _classifier("dinov2_vits14_reg")
dinov2_vitb14_lc = _classifier("dinov2_vitb14")
dinov2_vitb14_reg_lc = _classifier("dinov2_vitb14_reg")
dinov2_vitl14_lc = _classifier("dinov2_vitl14")
dinov2_vitl14_reg_lc = _classifier("dinov2_vitl14_reg")
dinov2_vitg14_lc = _classifier("dinov2_vitg14")
dinov2_vitg14_reg_lc = _classifier("dinov2_vitg14_reg")
