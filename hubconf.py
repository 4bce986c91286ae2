"""torch.hub entry points: the same names as ``ssl-distill models``.

>>> import torch
>>> model = torch.hub.load("/path/to/ssl_distill", "dinov2_vits14", source="local")
>>> model = torch.hub.load("/path/to/ssl_distill", "dinov2_vitb14_reg", source="local", pretrained=False)

Each entry point takes ``pretrained`` (default True), ``weights`` (a path or URL instead of the published file)
and architecture overrides, exactly like :func:`ssl_distill.hub.load`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep typing names out of the module namespace: torch.hub.list() shows every public callable
    from collections.abc import Callable
    from typing import Any

dependencies = ["torch"]


def _entrypoint(name: str) -> Callable[..., Any]:
    def entry(pretrained: bool = True, **kwargs: Any) -> Any:
        from ssl_distill.hub import load

        return load(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"DINOv2 backbone ``{name}`` (see MODEL_ZOO.md); kwargs as in ssl_distill.hub.load."
    return entry


dinov2_vits14 = _entrypoint("dinov2_vits14")
dinov2_vits14_reg = _entrypoint("dinov2_vits14_reg")
dinov2_vitb14 = _entrypoint("dinov2_vitb14")
dinov2_vitb14_reg = _entrypoint("dinov2_vitb14_reg")
dinov2_vitl14 = _entrypoint("dinov2_vitl14")
dinov2_vitl14_reg = _entrypoint("dinov2_vitl14_reg")
dinov2_vitg14 = _entrypoint("dinov2_vitg14")
dinov2_vitg14_reg = _entrypoint("dinov2_vitg14_reg")
