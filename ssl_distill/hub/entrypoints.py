"""The official DINOv2 ``torch.hub`` API served by ssl_distill: backbones and ImageNet-1k linear classifiers with the
signatures of facebookresearch/dinov2's ``hubconf.py``, so code written for it runs unchanged against this
repository (``torch.hub.load("/path/to/ssl_distill", "dinov2_vits14_lc", source="local")``).

The official arguments and what they do here:

* ``pretrained`` (default True): load the published weights (downloaded once into the cache, verified).
* ``weights``: the official enum (``"LVD142M"`` for backbones, ``"IMAGENET1K"`` for classifier heads; enum members
  with those names work too) = the published file. Beyond the official API: a file path or ``http(s)`` URL.
* ``block_chunks``: accepted and ignored. In the reference code it only groups blocks for FSDP wrapping; the model,
  its outputs and its weights do not depend on it (no ``blocks.<chunk>.<i>`` key ever reaches a file here).
* the architecture arguments of the reference ``DinoVisionTransformer`` (``img_size``, ``drop_path_rate``,
  ``interpolate_offset``, ...); ``embed_layer`` / ``act_layer`` / ``block_fn`` (module classes) are refused.
* ``layers`` (classifiers): how many last blocks' CLS tokens feed the head, 1 or 4 (default 4).
"""

from __future__ import annotations

import inspect
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_distill.hub.download import download_url, resolve_weights, weights_dir
from ssl_distill.hub.registry import HubError, get_linear_head, get_model
from ssl_distill.hub.resolve import read_file, unwrap_state_dict

BACKBONE_WEIGHTS = "LVD142M"  # dinov2.hub.backbones.Weights
HEAD_WEIGHTS = "IMAGENET1K"  # dinov2.hub.classifiers.Weights
_MODULE_ARGS = ("embed_layer", "act_layer", "block_fn")
_IGNORED_ARGS = ("block_chunks",)


def official_weights(weights: Any, enum: str, what: str) -> str | os.PathLike | None:
    """``None`` when ``weights`` names the official enum ``enum`` (= the published file), else the path or URL.

    Raises :class:`HubError` for another enum member, or a string that is neither an enum name nor an existing
    file nor a URL (the official code raises ``AssertionError("Unsupported weights")`` there).
    """
    if weights is None:
        return None
    if isinstance(weights, Enum):
        if weights.name == enum:
            return None
        raise HubError(f"unsupported weights {weights!r} for a {what}: the official enum is {enum!r}")
    if str(weights) == enum:
        return None
    text = str(weights)
    if "://" not in text and not Path(text).expanduser().is_file():
        raise HubError(f"weights={text!r} is neither the official {enum!r} (the published {what}) nor an existing "
                       "file; pass weights=" + repr(enum) + ", a file path or an http(s) URL")
    return weights


def architecture_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The reference entry points' ``**kwargs`` as :class:`ssl_distill.models.VisionTransformer` arguments:
    ``block_chunks`` dropped, module-class arguments and unknown names refused with one clear error."""
    from ssl_distill.models import VisionTransformer

    out = {k: v for k, v in kwargs.items() if k not in _IGNORED_ARGS}
    refused = [k for k in _MODULE_ARGS if k in out]
    if refused:
        raise HubError(f"{name}: {', '.join(refused)} (module classes of the reference implementation) cannot be "
                       "passed here; ssl_distill builds its own layers (pick the feed-forward with ffn_layer='mlp' "
                       "or 'swiglufused', the attention kernel with attn_impl=...)")
    allowed = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(out) - allowed)
    if unknown:
        raise HubError(f"{name}: unknown argument(s) {', '.join(unknown)}; the architecture arguments are "
                       f"{', '.join(sorted(allowed))} (plus pretrained, weights, progress)")
    return out


def backbone(name: str, *, pretrained: bool = True, weights: Any = BACKBONE_WEIGHTS, progress: bool | None = None,
             **kwargs: Any) -> nn.Module:
    """A zoo backbone with the official entry point's arguments (see the module docstring); eval mode.

    Returns a :class:`ssl_distill.models.VisionTransformer`: ``model(images (B, 3, H, W))`` -> CLS ``(B, D)``.
    """
    from ssl_distill.hub import load

    path = official_weights(weights, BACKBONE_WEIGHTS, "backbone")
    return load(name, pretrained=pretrained, weights=path, progress=progress, **architecture_kwargs(name, kwargs))


class LinearClassifier(nn.Module):
    """Backbone + linear head over the official classifier input (``dinov2.hub.classifiers``).

    ``linear_input(images (B, 3, H, W))`` is ``(B, (layers + avgpool) * D)``: the normalised CLS tokens of the last
    ``layers`` blocks, then (``avgpool``, always for the official heads) the mean of the last block's normalised
    patch tokens. ``forward`` gives logits ``(B, C)``. ``classes`` names the outputs when the head came from
    ``ssl-distill eval-linear`` (None for the ImageNet-1k heads: the standard 1000-class order).
    """

    def __init__(self, backbone: nn.Module, linear_head: nn.Linear, layers: int = 4, avgpool: bool = True,
                 classes: list[str] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.linear_head = linear_head
        self.layers = layers
        self.avgpool = avgpool
        self.classes = classes

    def linear_input(self, x: Tensor) -> Tensor:
        outputs = self.backbone.get_intermediate_layers(x, n=self.layers, return_class_token=True)
        tokens = [cls for _, cls in outputs] + ([outputs[-1][0].mean(dim=1)] if self.avgpool else [])
        return torch.cat(tokens, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_head(self.linear_input(x))


def _head_layout(obj: object, layers: int, path: Path) -> tuple[bool, list[str] | None]:
    """(avgpool, classes) of a head file: an ``ssl-distill eval-linear`` head records its input, which must be the
    one asked for; an official head (a bare ``{weight, bias}``) always uses the pooled patch token."""
    if not (isinstance(obj, dict) and "n_blocks" in obj and "avgpool" in obj):
        return True, None
    if int(obj["n_blocks"]) != layers:
        raise HubError(f"the head in '{path}' was trained on the CLS tokens of the last {obj['n_blocks']} block(s); "
                       f"pass layers={obj['n_blocks']} (got layers={layers})")
    classes = obj.get("classes")
    return bool(obj["avgpool"]), list(classes) if classes is not None else None


def load_linear_head(path: str | os.PathLike, layers: int, embed_dim: int) -> tuple[nn.Linear, bool, list | None]:
    """Read a linear head file (official ``{weight (C, (1 + layers) D), bias (C,)}`` or the best head saved by
    ``ssl-distill eval-linear``) for a width-``embed_dim`` backbone; returns (head, avgpool, class names)."""
    path = Path(path)
    obj = read_file(path)
    avgpool, classes = _head_layout(obj, layers, path)
    sd = unwrap_state_dict(obj, path)
    weight = sd.get("weight")
    if set(sd) != {"weight", "bias"} or weight is None or weight.ndim != 2:
        raise HubError(f"'{path}' is not a linear head (expected only 'weight' (C, F) and 'bias' (C,), got "
                       f"{', '.join(sorted(sd)[:6])})")
    expected = (layers + avgpool) * embed_dim
    if weight.shape[1] != expected:
        fits = {(n + 1) * embed_dim: n for n in (1, 4)}
        hint = (f"pass layers={fits[weight.shape[1]]}" if weight.shape[1] in fits and avgpool
                else "it belongs to a backbone of another width")
        raise HubError(f"the head in '{path}' takes {weight.shape[1]} features, but layers={layers} on a "
                       f"width-{embed_dim} backbone gives {expected}; {hint}")
    head = nn.Linear(expected, weight.shape[0])
    head.load_state_dict(sd, strict=True)
    return head, avgpool, classes


def classifier(name: str, *, layers: int = 4, pretrained: bool = True, weights: Any = HEAD_WEIGHTS,
               backbone_weights: str | os.PathLike | None = None, progress: bool | None = None,
               **kwargs: Any) -> LinearClassifier:
    """``<name>_lc``: backbone ``name`` + the published ImageNet-1k linear head over ``layers`` (1 or 4) blocks.

    ``weights`` is the head: ``"IMAGENET1K"`` (published, fetched from ``<base>/<model>/<model>_linear{4 or
    empty}_head.pth`` through the verified download) or a head file / URL, e.g. ``best_linear_head.pth`` from
    ``ssl-distill eval-linear``. ``backbone_weights`` (not in the official API) replaces the published backbone.
    Returns the classifier in eval mode: ``model(images (B, 3, H, W))`` -> logits ``(B, C)``.
    """
    head_path = official_weights(weights, HEAD_WEIGHTS, "linear head")
    entry = get_linear_head(get_model(name).name, layers) if head_path is None else None  # checked before downloads
    model = backbone(name, pretrained=pretrained, weights=backbone_weights, progress=progress, **kwargs)
    if entry is None:
        path = resolve_weights(head_path, progress=progress)
    elif pretrained:
        path = download_url(entry.url(), weights_dir() / entry.filename, entry.sha256, progress=progress,
                            min_size=entry.min_size, size=entry.size, weights=True)
    else:  # architecture only, like the official pretrained=False: a freshly initialised head
        head = nn.Linear((1 + layers) * model.embed_dim, entry.num_classes)
        return LinearClassifier(model, head, layers).eval()
    head, avgpool, classes = load_linear_head(path, layers, model.embed_dim)
    return LinearClassifier(model, head, layers, avgpool, classes).eval()
