"""The output formats every backbone shares (feature dicts, intermediate layers), so that our ViT and timm's give
the same keys and shapes (:mod:`ssl_distill.models.contract`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

FeatureDict = dict[str, Any]


def output_dict(x_norm: Tensor, x_prenorm: Tensor, masks: Tensor | None, num_register_tokens: int) -> FeatureDict:
    """Normalised tokens ``(B, 1 + R + N, D)`` -> ``x_norm_clstoken``, ``x_norm_regtokens``, ``x_norm_patchtokens``
    (and ``x_prenorm``, ``masks`` as given)."""
    r = num_register_tokens
    return {
        "x_norm_clstoken": x_norm[:, 0],
        "x_norm_regtokens": x_norm[:, 1 : r + 1],
        "x_norm_patchtokens": x_norm[:, r + 1 :],
        "x_prenorm": x_prenorm,
        "masks": masks,
    }


def selected_outputs(x_norm: Tensor, select: Tensor, masks: Tensor | None, num_register_tokens: int) -> FeatureDict:
    """From all normalised tokens ``(B, 1 + R + N, D)``: the CLS tokens and the patches ``select`` indexes in the
    flattened ``(B * N)`` grid, ``x_norm_selected_patchtokens`` ``(len(select), D)``."""
    patches = x_norm[:, 1 + num_register_tokens :].flatten(0, 1)
    return {"x_norm_clstoken": x_norm[:, 0], "x_norm_selected_patchtokens": patches[select.to(patches.device)],
            "masks": masks}


def dispatch_forward(model: Any, x: Any, masks: Any, is_training: bool, train_options: dict[str, Any],
                     head: Callable[[Tensor], Tensor] | None = None) -> Any:
    """A backbone's ``forward``: ``head(x_norm_clstoken)`` per batch, the feature dict(s) with ``is_training``, or,
    with ``train_options`` (``select_patches``, ``sample_keys``: list input and ``is_training`` only),
    ``model.forward_train`` — through ``forward`` so that DDP / FSDP wrappers see the training call."""
    if train_options:
        if not (is_training and isinstance(x, (list, tuple))):
            raise TypeError(f"{sorted(train_options)} need a list of crop batches and is_training=True")
        return model.forward_train(list(x), masks, **train_options)
    ret = model.forward_features(x, masks)
    if is_training:
        return ret
    head = head or (lambda t: t)
    if isinstance(ret, list):
        return [head(r["x_norm_clstoken"]) for r in ret]
    return head(ret["x_norm_clstoken"])


def block_indices(n: int | Sequence[int], depth: int) -> list[int]:
    """``get_intermediate_layers``' ``n``: an int -> the last ``n`` blocks; a sequence -> those indices; checked."""
    if isinstance(n, int):
        if not 1 <= n <= depth:
            raise ValueError(f"n={n} blocks requested but the model has {depth}; use 1 <= n <= {depth}")
        return list(range(depth - n, depth))
    idx = [int(i) for i in n]
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
    return idx


def intermediate_outputs(x: Tensor, outputs: list[Tensor], norm: Callable[[Tensor], Tensor] | None,
                         num_register_tokens: int, patch_size: int, reshape: bool, return_class_token: bool
                         ) -> tuple:
    """Block outputs ``[(B, 1 + R + N, D)]`` of images ``x`` -> DINOv2's ``get_intermediate_layers`` result:
    (normalised) patch tokens ``(B, N, D)`` or maps ``(B, D, H/p, W/p)``, paired with the CLS tokens if asked."""
    if norm is not None:
        outputs = [norm(out) for out in outputs]
    class_tokens = [out[:, 0] for out in outputs]
    outputs = [out[:, 1 + num_register_tokens :] for out in outputs]
    if reshape:
        B, _, H, W = x.shape
        p = patch_size
        outputs = [out.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
    if return_class_token:
        return tuple(zip(outputs, class_tokens))
    return tuple(outputs)
