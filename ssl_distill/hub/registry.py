"""The model zoo: registered backbone names -> architecture, weights URL, sha256, licence, published accuracy.

Official entries are the DINOv2 backbones (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features without
Supervision") and their register variants (Darcet et al., 2024, "Vision Transformers Need Registers"), with the
architecture arguments of the reference ``hubconf``: image size 518, patch 14, LayerScale init 1.0, SwiGLU for
ViT-g; register variants use 4 registers with antialiased, offset-free position-embedding interpolation.

The registry is an immutable table. To publish our own trained checkpoints, add :class:`ModelEntry` rows to
``_OWN`` below (with their sha256, see ``ssl-distill download`` which prints it) and regenerate the MODEL_ZOO.md
table with :func:`markdown_table`. Callers can also pass a :class:`ModelEntry` directly to ``ssl_distill.hub.load``
and ``ssl_distill.hub.download`` without registering it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ssl_distill.models.names import EMBED_DIMS  # widths from the one table of architectures

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
BASE_URL_ENV = "SSL_DISTILL_BASE_URL"


class HubError(ValueError):
    """A model-zoo problem the user can fix (unknown name, failed/corrupt download, wrong weights file)."""


@dataclass(frozen=True)
class ModelEntry:
    """One zoo model.

    Attributes:
        name: registry name, e.g. ``"dinov2_vits14"``.
        arch: backbone factory name in :mod:`ssl_distill.models` (``vit_small``, ...).
        arch_kwargs: keyword arguments for the factory (patch size, image size, registers, ...).
        path: file path relative to the base URL (``{base}/{path}``); None = no downloadable weights.
        sha256: hex digest of the weights file; verified after download when known.
        size: exact size of the weights file in bytes, when known (verified after download and in the cache).
        license: SPDX licence identifier of the weights.
        params: number of parameters of the backbone (checked against the architecture by the tests).
        knn_top1 / linear_top1: published ImageNet-1k top-1 (%) of frozen features, None if unpublished.
        timm_name: the equivalent ``timm`` model name, if any.
        source: where the weights and numbers come from.
        base_url: base of ``path``; ``$SSL_DISTILL_BASE_URL`` replaces it for every entry (mirrors).
    """

    name: str
    arch: str
    arch_kwargs: Mapping[str, Any]
    path: str | None
    sha256: str | None
    license: str
    params: int
    knn_top1: float | None = None
    linear_top1: float | None = None
    timm_name: str | None = None
    source: str = ""
    base_url: str = OFFICIAL_BASE_URL
    size: int | None = None

    @property
    def min_size(self) -> int:
        """Bytes a complete weights file has at least: its exact ``size`` when recorded, else the fp32 tensor data
        of ``params`` parameters (the official files store fp32), which any truncated download falls short of."""
        return self.size or 4 * self.params

    @property
    def num_register_tokens(self) -> int:
        return int(self.arch_kwargs.get("num_register_tokens", 0))

    @property
    def filename(self) -> str | None:
        """Basename of the weights file (the name it gets in the cache)."""
        return self.path.rsplit("/", 1)[-1] if self.path else None

    def url(self, base_url: str | None = None) -> str:
        """Download URL: ``{base}/{path}``, base = ``base_url`` or ``$SSL_DISTILL_BASE_URL`` or the entry's own."""
        if self.path is None:
            raise HubError(f"model {self.name!r} has no downloadable weights; pass weights=<path or URL>")
        base = base_url or os.environ.get(BASE_URL_ENV) or self.base_url
        return f"{base.rstrip('/')}/{self.path.lstrip('/')}"

    def build_kwargs(self) -> dict[str, Any]:
        return dict(self.arch_kwargs)


def _arch(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)



_DINOV2_SOURCE = "facebookresearch/dinov2 README (Oquab et al., 2023; Darcet et al., 2024)"

# (short, arch, extra kwargs, params, params with registers, (k-NN, linear), (k-NN, linear) with registers, timm)
_DINOV2_ROWS = (
    ("s", "vit_small", {"ffn_layer": "mlp"}, 22_056_576, 22_058_112, (79.0, 81.1), (79.1, 80.9), "vit_small_patch14"),
    ("b", "vit_base", {"ffn_layer": "mlp"}, 86_580_480, 86_583_552, (82.1, 84.5), (82.0, 84.6), "vit_base_patch14"),
    ("l", "vit_large", {"ffn_layer": "mlp"}, 304_368_640, 304_372_736, (83.5, 86.3), (83.8, 86.7), "vit_large_patch14"),
    ("g", "vit_giant2", {"ffn_layer": "swiglufused"}, 1_136_480_768, 1_136_486_912, (83.5, 86.5), (83.7, 87.1),
     "vit_giant_patch14"),
)


def _official_entries() -> tuple[ModelEntry, ...]:
    """The 8 DINOv2 backbones with the reference hubconf's arguments (``block_chunks`` does not exist here)."""
    common = {"patch_size": 14, "img_size": 518, "init_values": 1.0}
    plain = {"num_register_tokens": 0, "interpolate_antialias": False, "interpolate_offset": 0.1}
    regs = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}
    out = []
    for short, arch, extra, n, n_reg, acc, acc_reg, timm_stem in _DINOV2_ROWS:
        stem = f"dinov2_vit{short}14"
        for reg in (False, True):
            kwargs = {**common, **extra, **(regs if reg else plain)}
            out.append(ModelEntry(
                name=stem + ("_reg" if reg else ""),
                arch=arch,
                arch_kwargs=_arch(**kwargs),
                path=f"{stem}/{stem}{'_reg4' if reg else ''}_pretrain.pth",
                sha256=None,  # not published by the authors
                license="Apache-2.0",
                params=n_reg if reg else n,
                knn_top1=(acc_reg if reg else acc)[0],
                linear_top1=(acc_reg if reg else acc)[1],
                timm_name=f"{timm_stem}{'_reg4' if reg else ''}_dinov2",
                source=_DINOV2_SOURCE,
            ))
    return tuple(out)


# Our own released checkpoints go here (with sha256). Empty until the first release.
_OWN: tuple[ModelEntry, ...] = ()

MODELS: Mapping[str, ModelEntry] = MappingProxyType({e.name: e for e in (*_official_entries(), *_OWN)})


@dataclass(frozen=True)
class LinearHeadEntry:
    """A published ImageNet-1k linear classifier on a zoo backbone (the official ``<backbone>_lc`` entry points).

    The head is ``nn.Linear((1 + layers) * D, num_classes)`` over ``layers`` = 1: the last block's normalised CLS
    token and its mean patch token ``(B, 2D)``; 4: the CLS tokens of the last 4 blocks and the last block's mean
    patch token ``(B, 5D)``. The file holds that Linear's ``weight`` and ``bias``.

    Attributes:
        backbone: registry name of the backbone (``"dinov2_vits14"``).
        layers: 1 or 4.
        path: file path relative to the base URL; ``$SSL_DISTILL_BASE_URL`` replaces the base as for backbones.
        sha256: hex digest of the file when known (the authors publish none).
        size: exact size of the file in bytes, when known.
    """

    backbone: str
    layers: int
    path: str
    num_classes: int = 1000
    sha256: str | None = None
    base_url: str = OFFICIAL_BASE_URL
    size: int | None = None

    @property
    def min_size(self) -> int:
        """Bytes a complete head file has at least: ``size`` when recorded, else its fp32 weight and bias."""
        width = EMBED_DIMS[get_model(self.backbone).arch]
        return self.size or 4 * ((1 + self.layers) * width + 1) * self.num_classes

    @property
    def name(self) -> str:
        return f"{self.backbone}_lc"

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, base_url: str | None = None) -> str:
        """Download URL: ``{base}/{path}``, base = ``base_url`` or ``$SSL_DISTILL_BASE_URL`` or the entry's own."""
        base = base_url or os.environ.get(BASE_URL_ENV) or self.base_url
        return f"{base.rstrip('/')}/{self.path}"


def _official_heads() -> tuple[LinearHeadEntry, ...]:
    """``<model>/<model>[_reg4]_linear{4 or empty}_head.pth`` for each official backbone (reference hubconf)."""
    out = []
    for entry in _official_entries():
        stem = entry.name.removesuffix("_reg")
        full = stem + ("_reg4" if entry.num_register_tokens else "")
        for layers in (1, 4):
            suffix = "4" if layers == 4 else ""
            out.append(LinearHeadEntry(entry.name, layers, f"{stem}/{full}_linear{suffix}_head.pth"))
    return tuple(out)


LINEAR_HEADS: Mapping[tuple[str, int], LinearHeadEntry] = MappingProxyType(
    {(h.backbone, h.layers): h for h in _official_heads()}
)


def get_linear_head(backbone: str, layers: int = 4) -> LinearHeadEntry:
    """The published linear head of ``backbone`` over ``layers`` (1 or 4) blocks; unknown ones raise HubError."""
    if layers not in (1, 4):
        raise HubError(f"layers={layers!r} is not supported: the linear classifiers use the last 1 or 4 blocks")
    if (backbone, layers) not in LINEAR_HEADS:
        known = sorted({b for b, _ in LINEAR_HEADS})
        raise HubError(f"no published linear head for {backbone!r}; heads exist for {', '.join(known)}. For your "
                       "own backbone pass weights=<head file from `ssl-distill eval-linear`>.")
    return LINEAR_HEADS[(backbone, layers)]


def list_models() -> list[str]:
    """Registered model names, in table order."""
    return list(MODELS)


def get_model(name: str | ModelEntry) -> ModelEntry:
    """The entry for ``name`` (entries pass through); unknown names raise :class:`HubError` with suggestions."""
    if isinstance(name, ModelEntry):
        return name
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(str(name), list(MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise HubError(
        f"unknown model {name!r}.{hint} Known models: {', '.join(MODELS)} (list them with `ssl-distill models`)."
    )


def _fmt_acc(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def table_rows(models: Mapping[str, ModelEntry] | None = None) -> list[list[str]]:
    """Header + one row per model: name, arch, registers, params, k-NN, linear, licence, timm name."""
    rows = [["name", "arch", "registers", "params", "k-NN", "linear", "licence", "timm"]]
    for e in (models or MODELS).values():
        rows.append([
            e.name, f"{e.arch}/{e.arch_kwargs.get('patch_size', 16)}", str(e.num_register_tokens),
            f"{e.params / 1e6:.1f}M", _fmt_acc(e.knn_top1), _fmt_acc(e.linear_top1), e.license,
            e.timm_name or "-",
        ])
    return rows


def format_table(models: Mapping[str, ModelEntry] | None = None) -> str:
    """Plain-text table for the terminal (``ssl-distill models``)."""
    rows = table_rows(models)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(models: Mapping[str, ModelEntry] | None = None) -> str:
    """The same table in Markdown (MODEL_ZOO.md holds exactly this text; a test keeps them in sync)."""
    rows = table_rows(models)
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(r)) + " |" for r in rows[1:]]
    return "\n".join(out)
