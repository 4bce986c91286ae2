"""SSLMetaArch: student and EMA teacher (backbone + DINO head [+ iBOT head]), the losses, and one training step.

The step follows DINOv2 (Oquab et al. 2023, ``ssl_meta_arch.py``): the teacher sees the two global crops; student
global crop A is matched with teacher crop B and vice versa; every local crop is matched with both teacher crops;
the DINO terms are divided by their count; iBOT compares student and teacher on the masked global patch tokens
with per-image weighting; KoLeo spreads the student's global CLS tokens, per global crop.

Differences from the reference, all so that a run gives the same losses on any number of ranks:

* KoLeo runs on each global crop's CLS tokens gathered from all ranks (with gradient), not on each rank's share.
* The iBOT centre is the global mean of the masked teacher tokens (``update_center_masked``), not the mean of
  per-rank means; it no longer includes the zero-padding rows of the reference's fixed-size buffer.
* With ``local_crops_number=0`` the DINO terms are divided by 2 (their count), not 3.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_distill import distributed
from ssl_distill.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from ssl_distill.models import DINOHead, build_backbone
from ssl_distill.train.diagnostics import collapse_statistics, dino_ce_ratio

N_GLOBAL_CROPS = 2


def backbone_kwargs(cfg: DictConfig, student: bool = True) -> dict[str, Any]:
    """Constructor arguments of the backbone described by ``cfg.student`` (teacher: no stochastic depth)."""
    s = cfg.student
    kwargs = dict(
        patch_size=s.patch_size, img_size=cfg.crops.global_crops_size, init_values=s.layerscale or None,
        ffn_layer=s.ffn_layer, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias, ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens, interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset, attn_impl=s.attn_impl,
    )
    if s.depth:
        kwargs["depth"] = s.depth
    if student:
        kwargs.update(drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform)
    return kwargs


def _head(section: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim, section.head_n_prototypes, nlayers=section.head_nlayers, hidden_dim=section.head_hidden_dim,
        bottleneck_dim=section.head_bottleneck_dim,
    )


def _reshard(modules: nn.Module) -> None:
    """Free the gathered parameters of FSDP2-sharded modules (a no-op without FSDP)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in modules.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local_tensor(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class SSLMetaArch(nn.Module):
    """Student, teacher and losses of the DINOv2 recipe.

    ``student`` / ``teacher`` are ``nn.ModuleDict`` s with ``backbone``, ``dino_head`` and, when
    ``ibot.separate_head``, ``ibot_head``. The teacher starts as a copy of the student and never gets gradients.
    """

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_local_crops = cfg.crops.local_crops_number
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.student = self._build(cfg, student=True)
        self.teacher = self._build(cfg, student=False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()
        # Callables used for the student's forward passes: the modules themselves, or their DDP wrappers.
        self._student_fwd: dict[str, nn.Module] = dict(self.student.items())
        self._koleo_group = None
        self.autocast_dtype: torch.dtype | None = None

    def _build(self, cfg: DictConfig, student: bool) -> nn.ModuleDict:
        backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, student))
        parts = {"backbone": backbone, "dino_head": _head(cfg.dino, backbone.embed_dim)}
        if self.do_ibot and self.ibot_separate_head:
            parts["ibot_head"] = _head(cfg.ibot, backbone.embed_dim)
        return nn.ModuleDict(parts)

    # --------------------------------------------------------------------------------------------- distributed
    def set_student_forward(self, wrappers: dict[str, nn.Module]) -> None:
        """Route the student's forward passes through wrappers (e.g. DDP) that hold the same modules."""
        self._student_fwd = dict(wrappers)

    def set_koleo_group(self, group: Any) -> None:
        """A process group of its own for KoLeo's all-gather, so it never interleaves with DDP's reductions."""
        self._koleo_group = group

    @property
    def device(self) -> torch.device:
        return self.student.backbone.cls_token.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _patches_read(self, batch: dict[str, Tensor] | None) -> Tensor:
        """The patch tokens a loss reads (iBOT's masked global patches; none for local crops or without iBOT):
        the backbone's last block computes only those and the CLS tokens (``select_patches``)."""
        if batch is not None and self.do_ibot:
            return batch["mask_indices"]
        return torch.empty(0, dtype=torch.long, device=self.device)

    # ---------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def _teacher_targets(
        self, batch: dict[str, Tensor], teacher_temp: float
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Teacher probabilities: DINO ``(2, B, K)`` (crops swapped) and iBOT ``(M, K)`` for the masked tokens;
        and the teacher's CLS tokens ``(2B, D)`` (swapped like the DINO targets)."""
        out = self.teacher.backbone(batch["global_crops"], is_training=True,
                                    select_patches=self._patches_read(batch))
        cls = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls = torch.cat((cls[1], cls[0]))  # swapped, so student crop A meets teacher crop B
        n_cls = cls.shape[0]
        masked_patches = out["x_norm_selected_patchtokens"] if self.do_ibot else None
        if self.do_ibot and not self.ibot_separate_head:
            logits = self.teacher.dino_head(torch.cat((cls, masked_patches)))
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits = self.teacher.dino_head(cls)
            patch_logits = self.teacher.ibot_head(masked_patches) if self.do_ibot else None
        cls_logits, patch_logits = cls_logits.float(), patch_logits.float() if patch_logits is not None else None
        if self.cfg.train.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            ibot_t = None
            if self.do_ibot:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_patch_loss.update_center_masked(patch_logits)
        else:  # sinkhorn_knopp
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            ibot_t = None
            if self.do_ibot:
                ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp, batch["n_masked_patches"]
                )
        return dino_t.view(N_GLOBAL_CROPS, -1, dino_t.shape[-1]), ibot_t, cls

    # ---------------------------------------------------------------------------------------------- student
    def _student_logits(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Student head outputs: ``global_cls`` ``(2B, K)``, ``local_cls`` ``(nB, K)``, ``masked`` ``(M, K')``,
        and the backbone's global CLS tokens ``global_tokens`` ``(2B, D)`` for KoLeo."""
        crops, masks = [batch["global_crops"]], [batch["masks"]]
        if self.n_local_crops > 0:
            crops.append(batch["local_crops"])
            masks.append(None)
        select = [self._patches_read(batch)] + [self._patches_read(None)] * (len(crops) - 1)
        outs = self._student_fwd["backbone"](crops, masks=masks, is_training=True, select_patches=select)
        g = outs[0]
        pieces = [g["x_norm_clstoken"]]
        if self.n_local_crops > 0:
            pieces.insert(0, outs[1]["x_norm_clstoken"])
        masked = None
        if self.do_ibot:
            masked = g["x_norm_selected_patchtokens"]
            if not self.ibot_separate_head:
                pieces.append(masked)
        sizes = [p.shape[0] for p in pieces]
        logits = list(self._student_fwd["dino_head"](torch.cat(pieces)).split(sizes))  # one head call
        result = {"global_tokens": g["x_norm_clstoken"]}
        result["local_cls"] = logits.pop(0) if self.n_local_crops > 0 else None
        result["global_cls"] = logits.pop(0)
        if self.do_ibot:
            result["masked"] = logits.pop(0) if not self.ibot_separate_head else self._student_fwd["ibot_head"](masked)
        return result

    def _koleo(self, global_tokens: Tensor) -> Tensor:
        terms = []
        for chunk in global_tokens.chunk(N_GLOBAL_CROPS):  # never between two crops of one image
            if distributed.get_world_size() > 1:
                chunk = distributed.all_gather_with_grad(chunk, group=self._koleo_group)
            terms.append(self.koleo_loss(chunk))
        return sum(terms)

    # ------------------------------------------------------------------------------------------------- step
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev = self.device
        nb = dev.type == "cuda"
        return {
            "global_crops": batch["collated_global_crops"].to(dev, non_blocking=nb),
            "local_crops": batch["collated_local_crops"].to(dev, non_blocking=nb),
            "masks": batch["collated_masks"].to(dev, non_blocking=nb),
            "mask_indices": batch["mask_indices_list"].to(dev, non_blocking=nb),
            "masks_weight": batch["masks_weight"].to(dev, non_blocking=nb),
            "n_masked_patches": batch["n_masked_patches"].to(dev, non_blocking=nb),
        }

    def compute_losses(
        self, batch: dict[str, Any], teacher_temp: float, diagnostics: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (scalar with graph) and the individual losses (detached) for one batch; with ``diagnostics``
        also the collapse statistics (``diag_*``, see :mod:`ssl_distill.train.diagnostics`; a collective)."""
        b = self._to_device(batch)
        cfg = self.cfg
        n_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * self.n_local_crops
        with self._autocast():
            dino_t, ibot_t, teacher_cls = self._teacher_targets(b, teacher_temp)
            _reshard(self.teacher)  # the teacher has no backward to reshard it (FSDP)
            s = self._student_logits(b)
        losses: dict[str, Tensor] = {}
        if self.n_local_crops > 0:
            losses["dino_local_crops_loss"] = (
                self.dino_loss(s["local_cls"].float().chunk(self.n_local_crops), list(dino_t)) / n_terms
            )
        # Both global pairs at once: (2B, K) student rows against the swapped teacher rows; x2 = sum of 2 means.
        losses["dino_global_crops_loss"] = (
            self.dino_loss([s["global_cls"].float()], [dino_t.flatten(0, 1)]) * N_GLOBAL_CROPS / n_terms
        )
        total = cfg.dino.loss_weight * sum(losses.values())
        if self.do_koleo:
            losses["koleo_loss"] = cfg.dino.koleo_loss_weight * self._koleo(s["global_tokens"])
            total = total + losses["koleo_loss"]
        if self.do_ibot:
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                s["masked"].float(), ibot_t, student_masks_flat=b["masks"], masks_weight=b["masks_weight"]
            )
            total = total + cfg.ibot.loss_weight * losses["ibot_loss"]
        losses = {k: v.detach() for k, v in losses.items()}
        losses["total_loss"] = total.detach()
        if diagnostics:
            losses.update(self._diagnostics(losses, dino_t, ibot_t, teacher_cls, s))
        return total, losses

    def _diagnostics(self, losses: dict[str, Tensor], dino_t: Tensor, ibot_t: Tensor | None, teacher_cls: Tensor,
                     s: dict[str, Tensor]) -> dict[str, Tensor]:
        """Collapse statistics from tensors this step already holds (no extra forward); see ``compute_losses``."""
        stats = collapse_statistics(dino_t.flatten(0, 1), teacher_cls, ibot_t, s.get("masked"),
                                    self.ibot_patch_loss.student_temp)
        out = {k: torch.tensor(v, device=self.device) for k, v in stats.items()}
        dino_sum = sum(v for k, v in losses.items() if k.startswith("dino_"))
        out["diag_dino_ce_ratio"] = dino_ce_ratio(dino_sum, self.cfg.dino.head_n_prototypes)
        return out

    def forward_backward(
        self, batch: dict[str, Any], teacher_temp: float, scaler: torch.amp.GradScaler | None = None,
        diagnostics: bool = False,
    ) -> dict[str, Tensor]:
        """Compute the losses and back-propagate them; returns the individual (detached) losses (and, with
        ``diagnostics``, the collapse statistics)."""
        total, losses = self.compute_losses(batch, teacher_temp, diagnostics)
        (scaler.scale(total) if scaler is not None else total).backward()
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = m * teacher + (1 - m) * student`` with multi-tensor ops (local shards under FSDP)."""
        t_params, s_params = [], []
        for name, s_mod in self.student.items():
            for (ns, ps), (nt, pt) in zip(s_mod.named_parameters(), self.teacher[name].named_parameters()):
                if ns != nt:
                    raise RuntimeError(f"student/teacher parameter mismatch: {ns} vs {nt}")
                s_params.append(_local_tensor(ps.detach()))
                t_params.append(_local_tensor(pt.detach()))
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)  # t + (1 - m) * (s - t): one pass

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        """Clip each student part's gradients separately (as DINOv2 does); returns their pre-clip norms."""
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                norms[name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return norms
