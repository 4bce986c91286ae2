"""Backbones by name and from a config: the one place that maps ``student.*`` keys to constructor arguments.

The architecture names and allowed values are listed once, in :mod:`ssl_distill.config` (which validates configs);
here each name is the ``vit_*`` factory of :mod:`ssl_distill.models.vit` of the same name.
"""

from __future__ import annotations

from typing import Any

from ssl_distill.config import ARCHS
from ssl_distill.models import vit
from ssl_distill.models.vit import VisionTransformer

BACKBONE_NAMES = ARCHS


def build_backbone(name: str, **kwargs: Any) -> VisionTransformer:
    """Backbone by factory name (one of :data:`BACKBONE_NAMES`), forwarding ``kwargs`` to the factory."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")
    return getattr(vit, name)(**kwargs)


def backbone_kwargs(cfg: Any, stochastic_depth: bool = False) -> dict[str, Any]:
    """Constructor arguments of the backbone ``cfg.student`` describes, ``img_size = crops.global_crops_size``;
    stochastic depth only when asked for (the student in training; teachers and evaluation never drop)."""
    s = cfg.student
    kwargs = dict(
        patch_size=s.patch_size, img_size=cfg.crops.global_crops_size, init_values=s.layerscale or None,
        ffn_layer=s.ffn_layer, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias, ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens, interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset, attn_impl=s.attn_impl, weight_init=s.weight_init,
    )
    if s.depth:
        kwargs["depth"] = s.depth
    if stochastic_depth:
        kwargs.update(drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform,
                      drop_path_mode=s.drop_path_mode)
    return kwargs


def backbone_from_config(cfg: Any, stochastic_depth: bool = False) -> VisionTransformer:
    """The backbone ``cfg.student`` describes (see :func:`backbone_kwargs`)."""
    return build_backbone(cfg.student.arch, **backbone_kwargs(cfg, stochastic_depth))
