"""Backbones by name and from a config: the one place that maps ``student.*`` keys to constructor arguments.

The names are the table of :mod:`ssl_distill.models.names` (which the config validates against): each of
:data:`BACKBONE_NAMES` is the ``vit_*`` factory of :mod:`ssl_distill.models.vit` of the same name, and
``timm/<model name>`` is a :class:`~ssl_distill.models.timm_vit.TimmViT`. Both satisfy the backbone contract
(:class:`~ssl_distill.models.contract.Backbone`).
"""

from __future__ import annotations

import logging
from typing import Any

from ssl_distill.models import vit
from ssl_distill.models.contract import Backbone
from ssl_distill.models.names import ARCHS, timm_model_name

logger = logging.getLogger(__name__)
BACKBONE_NAMES = ARCHS


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Backbone by factory name (one of :data:`BACKBONE_NAMES`, or ``timm/<model name>``), forwarding ``kwargs``
    to the factory."""
    timm_name = timm_model_name(name)
    if timm_name is not None:
        from ssl_distill.models.timm_vit import TimmViT

        return TimmViT(timm_name, **kwargs)
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}, timm/<model name>")
    return getattr(vit, name)(**kwargs)


def backbone_kwargs(cfg: Any, stochastic_depth: bool = False) -> dict[str, Any]:
    """Constructor arguments of the backbone ``cfg.student`` describes, ``img_size = crops.global_crops_size``;
    stochastic depth only when asked for (the student in training; teachers and evaluation never drop)."""
    s = cfg.student
    if timm_model_name(s.arch) is not None:
        return _timm_kwargs(cfg, stochastic_depth)
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


def _timm_kwargs(cfg: Any, stochastic_depth: bool) -> dict[str, Any]:
    """A timm ViT's arguments: its name decides the architecture; ``student.patch_size`` (crops and masks are cut
    for it) and ``student.depth`` (when set) override it; stochastic depth and ``weight_init`` as for our ViT."""
    s = cfg.student
    kwargs: dict[str, Any] = dict(img_size=cfg.crops.global_crops_size, patch_size=s.patch_size,
                                  depth=s.depth or None, weight_init=s.weight_init)
    if stochastic_depth:
        kwargs.update(drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform)
        if s.drop_path_mode == "subset" and s.drop_path_rate > 0:
            logger.warning("student.drop_path_mode=subset: timm's blocks compute every branch, so %s drops in "
                           "'mask' mode (the same draws)", s.arch)
    return kwargs


def backbone_from_config(cfg: Any, stochastic_depth: bool = False) -> Backbone:
    """The backbone ``cfg.student`` describes (see :func:`backbone_kwargs`)."""
    return build_backbone(cfg.student.arch, **backbone_kwargs(cfg, stochastic_depth))
