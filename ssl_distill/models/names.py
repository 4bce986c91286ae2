"""The one table of backbone names and the choices of their arguments; no torch here.

:mod:`ssl_distill.config` validates ``student.*`` against it and ``ssl-distill --help`` imports the config, so this
module (like the lazy :mod:`ssl_distill.models` package) imports nothing heavy. The factories of
:mod:`ssl_distill.models.vit` build these architectures; :mod:`ssl_distill.hub.registry` reads the widths from here.

``student.arch`` is one of :data:`ARCHS` (our :class:`~ssl_distill.models.vit.VisionTransformer`) or
``timm/<model name>`` (a timm ViT behind the same contract, :mod:`ssl_distill.models.timm_vit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ArchSpec:
    """One architecture of our ViT: width, depth, attention heads and MLP ratio."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    note: str = ""


VIT_ARCHS = MappingProxyType({
    "vit_tiny": ArchSpec(192, 12, 3),
    "vit_small": ArchSpec(384, 12, 6),
    "vit_base": ArchSpec(768, 12, 12),
    "vit_large": ArchSpec(1024, 24, 16),
    "vit_giant2": ArchSpec(1536, 40, 24, note="DINOv2 trains it with ffn_layer='swiglufused'"),
})
ARCHS = tuple(VIT_ARCHS)
EMBED_DIMS = MappingProxyType({name: spec.embed_dim for name, spec in VIT_ARCHS.items()})

TIMM_PREFIX = "timm/"
TIMM_MODULES = ("vision_transformer", "deit", "eva")  # timm's modules whose ViTs TimmViT drives
TIMM_EXAMPLES = ("vit_small_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
                 "eva02_small_patch14_224")

# student.* keys that describe our ViT's architecture; a timm model's name decides them instead
OWN_VIT_KEYS = ("layerscale", "ffn_layer", "qkv_bias", "proj_bias", "ffn_bias", "num_register_tokens",
                "interpolate_antialias", "interpolate_offset", "attn_impl")

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")
DROP_PATH_MODES = ("auto", "subset", "mask")
WEIGHT_INITS = ("trunc_normal", "xavier")


def timm_model_name(arch: str) -> str | None:
    """``"vit_small_patch16_224"`` for ``"timm/vit_small_patch16_224"``; None for our own architectures."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def timm_problem(name: str) -> str | None:
    """Why timm model ``name`` cannot be a backbone (None when it can): unknown to timm, or not one of its ViTs
    (:data:`TIMM_MODULES`). Imports timm (and torch): call it only for a ``timm/`` arch."""
    import difflib

    import timm
    from timm.models import is_model_in_modules

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        return f"timm has no model '{name}'{hint} (timm.list_models('vit_*') lists the ViTs)"
    if not is_model_in_modules(name, list(TIMM_MODULES)):
        return (f"timm/{name} is not one of timm's ViTs with a class token ({', '.join(TIMM_MODULES)} families); "
                f"use e.g. timm/{TIMM_EXAMPLES[0]} or timm/{TIMM_EXAMPLES[3]}")
    return None


def arch_problem(arch: str) -> str | None:
    """Why ``arch`` is not a backbone name (None when it is): one of :data:`ARCHS` or ``timm/<model name>``.
    Whether timm knows the model is checked when it is built (that needs torch)."""
    if arch in VIT_ARCHS:
        return None
    name = timm_model_name(arch)
    if name is not None and name.strip() and "/" not in name:
        return None
    return (f"'{arch}' is not one of {list(ARCHS)} and not timm/<model name> (e.g. timm/{TIMM_EXAMPLES[0]}, "
            f"timm/{TIMM_EXAMPLES[3]})")
