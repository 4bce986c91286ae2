"""Parameter groups and the AdamW optimizer of the DINOv2 recipe.

Groups follow DINOv2's ``get_params_groups_with_decay`` + ``fuse_params_groups``: layer-wise lr decay
(``layerwise_decay ** (depth + 1 - layer_id)``, layer 0 = patch embedding and tokens, layer i+1 = block i, heads at
depth + 1), a patch-embedding lr multiplier, and a flag for the head's ``last_layer`` (frozen during the first
``freeze_last_layer_epochs``). No weight decay for biases, norms, LayerScale gammas **and tokens** (``cls_token``,
``pos_embed``, ``register_tokens``, ``mask_token``) — the reference decays the tokens; we follow timm/BEiT here.

What each parameter is comes from the model, as timm models declare it: ``no_weight_decay()`` (names),
``layer_id(name)`` and ``n_blocks`` (backbones: the contract, models/contract.py), ``last_layer_names()`` (heads)
and the backbone's ``patch_embed`` module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def param_groups(
    module: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0, is_backbone: bool = False
) -> list[dict]:
    """Fused parameter groups of one sub-model (a backbone with ``is_backbone``, else a head).

    Each group: ``params``, ``lr_multiplier``, ``wd_multiplier`` (0 or 1), ``is_last_layer``, ``is_backbone`` and
    ``names``.
    """
    if not callable(getattr(module, "no_weight_decay", None)):
        raise TypeError(f"{type(module).__name__} does not declare no_weight_decay(); parameter groups need a model "
                        "that does (VisionTransformer, DINOHead).")
    no_decay = module.no_weight_decay()
    last_layer = module.last_layer_names() if hasattr(module, "last_layer_names") else set()
    patch_embed = {f"patch_embed.{n}" for n, _ in module.patch_embed.named_parameters()} if is_backbone else set()
    num_layers = module.n_blocks if is_backbone else 0
    fused: dict[tuple[float, float, bool], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = layerwise_decay ** (num_layers + 1 - module.layer_id(name)) if is_backbone else 1.0
        if name in patch_embed:
            lr_mult *= patch_embed_lr_mult
        key = (lr_mult, 0.0 if name in no_decay else 1.0, name in last_layer)
        group = fused.setdefault(key, {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                       "is_last_layer": key[2], "is_backbone": is_backbone})
        group["params"].append(param)
        group["names"].append(name)
    return list(fused.values())


def build_optimizer(groups: Iterable[dict], betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` with PyTorch's fused kernel (CUDA and CPU: one pass over each parameter's state;
    about 5x faster than the multi-tensor version on CPU for a ViT-S + DINO head); multi-tensor (foreach) on
    other devices."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(list(groups), lr=0.0, betas=betas, fused=fused, foreach=None if fused else True)


def apply_optim_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float,
                         backbone_lr_factor: float = 1.0) -> None:
    """Set every group's lr and weight decay for this iteration (DINOv2's ``apply_optim_scheduler``);
    ``backbone_lr_factor`` 0 keeps the backbone fixed (``optim.freeze_backbone_epochs``: AdamW with lr 0 changes
    neither the weights nor, decoupled, their decay)."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        if group.get("is_backbone"):
            base *= backbone_lr_factor
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
