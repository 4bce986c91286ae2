"""Model zoo: registry, verified downloads, format conversion, and one-line loading of pretrained backbones.

>>> from ssl_distill import hub
>>> model = hub.load("dinov2_vits14")                      # official DINOv2 ViT-S/14, downloaded once, cached
>>> model = hub.load("dinov2_vitb14_reg", pretrained=False)  # architecture only
>>> model = hub.load("dinov2_vits14", weights="run/model_0012500.pth")  # our training checkpoint (teacher)
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ssl_distill.hub.convert import convert_state_dict, detect_format, to_dinov2
from ssl_distill.hub.download import cache_dir, download, download_url, resolve_weights, sha256_file, weights_dir
from ssl_distill.hub.registry import MODELS, HubError, ModelEntry, get_model, list_models
from ssl_distill.hub.resolve import convert_file, load_strict, read_backbone_weights, read_weights, resolve_backbone

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "HubError",
    "ModelEntry",
    "cache_dir",
    "convert_file",
    "convert_state_dict",
    "detect_format",
    "download",
    "download_url",
    "get_model",
    "list_models",
    "load",
    "load_state_dict",
    "read_weights",
    "resolve_backbone",
    "resolve_weights",
    "sha256_file",
    "to_dinov2",
    "weights_dir",
]


load_state_dict = load_strict  # the published name: strict loading with the fix in the error


def load(name: str | ModelEntry, pretrained: bool = True, weights: str | os.PathLike | None = None,
         progress: bool | None = None, **kwargs: Any) -> Any:
    """Build the zoo backbone ``name`` and (optionally) load its weights, strictly; returns it in eval mode.

    Args:
        name: registry name (``ssl-distill models``) or a :class:`ModelEntry`.
        pretrained: load the entry's published weights (downloaded into the cache on first use).
        weights: instead, a file path or ``http(s)`` URL holding a backbone state dict (DINOv2, timm or Hugging
            Face layout, ``.pth`` or ``.safetensors``) or one of our training checkpoints (its teacher backbone).
        progress: download progress bar (None: only on an interactive terminal).
        **kwargs: architecture overrides passed to the backbone factory (e.g. ``attn_impl="math"``).

    Returns:
        a :class:`ssl_distill.models.VisionTransformer`; ``model(images (B, 3, H, W))`` gives CLS features
        ``(B, D)``, ``model.forward_features`` the full token dict.
    """
    from ssl_distill.models import build_backbone

    entry = get_model(name)
    model = build_backbone(entry.arch, **{**entry.build_kwargs(), **kwargs})
    if weights is not None:
        path = resolve_weights(weights, progress=progress)
    elif pretrained:
        path = download(entry, progress=progress)
    else:
        return model.eval()
    state_dict, _ = read_backbone_weights(path)
    load_strict(model, state_dict, f"'{path}'", advice=f"these weights are not {entry.name}'s architecture; pick "
                "the model name that matches them (`ssl-distill models`) or pass pretrained=False")
    logger.info("loaded %s weights from %s", entry.name, path)
    return model.eval()
