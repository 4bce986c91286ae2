"""The baseline of ``train_step.py``: the DINOv2 training step written the way a lightly + timm user writes it.

It follows lightly's own DINOv2 example (``examples/pytorch/dinov2.py`` in lightly-ai/lightly): a timm
``VisionTransformer`` (learned position embedding, ``dynamic_img_size=True``, LayerScale 1e-5) wrapped in
lightly's ``MaskedVisionTransformerTIMM``, which re-initialises it the MAE way (Xavier-uniform Linear layers and patch
embedding, CLS token N(0, 0.02): 1.7-3.6x larger than the truncated normal 0.02 of timm and DINOv2; our
student.weight_init=xavier does the same); lightly's
``DINOv2ProjectionHead`` shared by DINO and iBOT (DINOv2's
default ``ibot.separate_head=False``); lightly's ``DINOLoss``, ``IBOTPatchLoss`` and ``KoLeoLoss`` (weight 0.1,
per global crop); ``update_momentum`` for the EMA teacher; ``torch.optim.AdamW`` with decay / no-decay groups.
Like our recipe (and unlike the example) it clips the gradient norm of backbone and head separately at 3.0.

Same crops and the same iBOT masks as our step (taken from our batch dict), so both run the same recipe on the
same inputs.
Needs ``pip install 'ssl-distill[bench]'`` (lightly).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


class OurViTEncoder(nn.Module):
    """Our :class:`~ssl_distill.models.vit.DinoVisionTransformer` behind the interface of lightly's
    ``MaskedVisionTransformerTIMM`` that :class:`LightlyDINOv2` uses: ``encode(images, mask)`` -> normalised tokens
    ``(B, 1 + N, D)`` (``mask`` ``(B, 1 + N)`` with the CLS slot, True = masked) and ``forward(images)`` -> CLS."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def encode(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        out = self.vit.forward_features(images, None if mask is None else mask[:, 1:])
        return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit.forward_features(images)["x_norm_clstoken"]


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False
    module.eval()


class LightlyDINOv2(nn.Module):
    """Student/teacher backbones and heads, the three lightly losses and the step (see the module docstring).

    Args:
        arch: one of :data:`ARCHS` (``depth`` may be overridden for smoke tests).
        patch_size, img_size: ViT patch size and the size of the learned position grid (global crop size).
        n_prototypes, hidden_dim, bottleneck_dim: DINOv2 head sizes.
        drop_path_rate: uniform stochastic depth of the student.
        init_values: LayerScale init of the timm ViT (the example's 1e-5).
        ibot_weight, koleo_weight: loss weights (the example's 1.0 and 0.1).
        backbone: one of our ViTs to use instead of timm's (wrapped in :class:`OurViTEncoder`; its own
            stochastic depth applies), for telling backbone effects from loss-code effects.
    """

    def __init__(self, arch: str, patch_size: int, img_size: int, n_prototypes: int, hidden_dim: int,
                 bottleneck_dim: int, drop_path_rate: float, depth: int | None = None, init_values: float = 1e-5,
                 ibot_weight: float = 1.0, koleo_weight: float = 0.1, backbone: nn.Module | None = None) -> None:
        super().__init__()
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        a = dict(ARCHS[arch])
        if depth is not None:
            a["depth"] = depth
        # built even when ``backbone`` replaces it, so that the heads get the same initial draws either way
        vit = TimmViT(img_size=img_size, patch_size=patch_size, num_classes=0, pos_embed="learn",
                      dynamic_img_size=True, init_values=init_values, **a)
        if backbone is None:
            self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False,
                                                                pos_embed_initialization="skip")
            self.student_backbone = copy.deepcopy(self.teacher_backbone)
            update_drop_path_rate(self.student_backbone.vit, drop_path_rate=drop_path_rate, mode="uniform")
        else:
            self.student_backbone = OurViTEncoder(backbone)
            self.teacher_backbone = copy.deepcopy(self.student_backbone)
        def head() -> nn.Module:
            return DINOv2ProjectionHead(input_dim=a["embed_dim"], hidden_dim=hidden_dim,
                                        bottleneck_dim=bottleneck_dim, output_dim=n_prototypes)

        self.student_head = head()
        self.teacher_head = head()  # weight_norm modules cannot be deep-copied
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        _freeze(self.teacher_backbone)
        _freeze(self.teacher_head)
        self.dino_criterion = DINOLoss(output_dim=n_prototypes)
        self.ibot_criterion = IBOTPatchLoss(output_dim=n_prototypes)
        self.koleo_criterion = KoLeoLoss()
        self.ibot_weight, self.koleo_weight = ibot_weight, koleo_weight

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW with the usual decay / no-decay groups (biases, norms, tokens, LayerScale: no decay)."""
        decay, no_decay = [], []
        for module in (self.student_backbone, self.student_head):
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name else decay).append(p)
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=1e-4, betas=(0.9, 0.999))

    def compute_loss(self, batch: dict[str, Any], teacher_temp: float) -> Tensor:
        """DINO + iBOT + KoLeo (weights 1, ``ibot_weight``, ``koleo_weight``) for one batch dict of
        :func:`ssl_distill.data.collate_data_and_cast`."""
        dev = self.student_head.last_layer.weight_v.device
        global_views = batch["global_crops"].to(dev, non_blocking=True)
        local_views = batch["local_crops"].to(dev, non_blocking=True)
        patch_mask = batch["masks"].to(dev, non_blocking=True)  # (2B, N)
        n_views = 2 + local_views.shape[0] // (global_views.shape[0] // 2)
        B2, N = patch_mask.shape
        side = int(round(N**0.5))
        mask = torch.zeros((B2, N + 1), dtype=torch.bool, device=dev)  # lightly's mask includes the CLS slot
        mask[:, 1:] = patch_mask
        block_mask = patch_mask.view(B2, side, side)

        with torch.no_grad():
            t_feats = self.teacher_backbone.encode(global_views)
            teacher_cls_out = self.teacher_head(t_feats[:, 0])
            teacher_masked_out = self.teacher_head(t_feats[mask])

        s_feats = self.student_backbone.encode(global_views, mask=mask)
        s_global_cls = s_feats[:, 0]
        student_global_cls_out = self.student_head(s_global_cls)
        student_masked_out = self.student_head(s_feats[mask])
        student_cls_out = student_global_cls_out
        if n_views > 2:  # a recipe without local crops (crops.local_crops_number=0) has none to encode
            s_local_cls = self.student_backbone.encode(local_views)[:, 0]
            student_cls_out = torch.cat([student_global_cls_out, self.student_head(s_local_cls)])

        dino = self.dino_criterion(teacher_out=list(teacher_cls_out.chunk(2)),
                                   student_out=list(student_cls_out.chunk(n_views)), teacher_temp=teacher_temp)
        ibot = self.ibot_criterion(teacher_out=teacher_masked_out, student_out=student_masked_out, mask=block_mask,
                                   teacher_temp=teacher_temp)
        koleo = self.koleo_weight * sum(self.koleo_criterion(t) for t in s_global_cls.chunk(2))
        return dino + self.ibot_weight * ibot + koleo

    def step(self, batch: dict[str, Any], optimizer: torch.optim.Optimizer, teacher_temp: float = 0.07,
             momentum: float = 0.994, clip_grad: float = 3.0, amp_dtype: torch.dtype | None = None) -> float:
        """One training step: losses (under autocast to ``amp_dtype`` if given), backward, per-part clipping,
        AdamW, EMA. Returns the loss."""
        from lightly.models.utils import update_momentum

        optimizer.zero_grad(set_to_none=True)
        dev = self.student_head.last_layer.weight_v.device
        with torch.autocast(dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = self.compute_loss(batch, teacher_temp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student_backbone.parameters(), clip_grad)
        torch.nn.utils.clip_grad_norm_(self.student_head.parameters(), clip_grad)
        optimizer.step()
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        return float(loss.detach())
