"""SSLMetaArch: student and EMA teacher (backbone + DINO head [+ iBOT head]), the losses, and one training step.

The step follows DINOv2 (Oquab et al. 2023, ``ssl_meta_arch.py``): the teacher sees the two global crops; student
global crop A is matched with teacher crop B and vice versa; every local crop is matched with both teacher crops;
the DINO terms are divided by their count; iBOT compares student and teacher on the masked global patch tokens
with per-image weighting; KoLeo spreads the student's global CLS tokens, per global crop.

Differences from the reference, all so that a run gives the same losses on any number of ranks:

* KoLeo runs on each global crop's CLS tokens gathered from all ranks (with gradient), not on each rank's share.
* The iBOT centre is the global mean of the masked teacher tokens (``update_center_masked``), not the mean of
  per-rank means (the reference, too, slices its teacher outputs to the real masked tokens first).
* With ``local_crops_number=0`` the DINO terms are divided by 2 (their count), not 3.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_distill.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from ssl_distill.models import backbone_from_config
from ssl_distill.train.arch_base import N_GLOBAL_CROPS, StudentTeacherArch, dino_head, reshard


class SSLMetaArch(StudentTeacherArch):
    """Student, teacher and losses of the DINOv2 recipe.

    ``student`` / ``teacher`` are ``nn.ModuleDict`` s with ``backbone``, ``dino_head`` and, when
    ``ibot.separate_head``, ``ibot_head``. The teacher starts as a copy of the student (after the student took
    ``student.pretrained_weights``, unless ``load_pretrained`` is False, e.g. when a checkpoint is resumed) and never
    gets gradients.
    """

    def __init__(self, cfg: DictConfig, load_pretrained: bool = True) -> None:
        super().__init__(cfg)
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.student = self._build(cfg, student=True)
        self.teacher = self._build(cfg, student=False)
        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()
        if load_pretrained and cfg.student.pretrained_weights:
            from ssl_distill.train.pretrained import load_pretrained_student

            load_pretrained_student(self, cfg)
        self._student_ready()

    def _build(self, cfg: DictConfig, student: bool) -> nn.ModuleDict:
        backbone = backbone_from_config(cfg, stochastic_depth=student)
        parts = {"backbone": backbone, "dino_head": dino_head(cfg.dino, backbone.embed_dim)}
        if self.do_ibot and self.ibot_separate_head:
            parts["ibot_head"] = dino_head(cfg.ibot, backbone.embed_dim)
        return nn.ModuleDict(parts)

    def _patches_read(self, batch: dict[str, Tensor] | None) -> Tensor:
        """The patch tokens a loss reads (iBOT's masked global patches; none for local crops or without iBOT):
        the backbone's last block computes only those and the CLS tokens (``select_patches``)."""
        if batch is not None and self.do_ibot:
            return batch["mask_indices"]
        return torch.empty(0, dtype=torch.long, device=self.device)

    # ---------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def _teacher_targets(self, batch: dict[str, Tensor], teacher_temp: float
                         ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Teacher probabilities: DINO ``(2, B, K)`` (crops swapped) and iBOT ``(M, K)`` for the masked tokens;
        and the teacher's CLS tokens ``(2B, D)`` (swapped like the DINO targets)."""
        out = self.teacher.backbone([batch["global_crops"]], is_training=True,
                                    select_patches=[self._patches_read(batch)])[0]
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
        return (*self._teacher_probabilities(cls_logits, patch_logits, teacher_temp), cls)

    # ---------------------------------------------------------------------------------------------- student
    def _student_logits(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Student head outputs: ``global_cls`` ``(2B, K)``, ``local_cls`` ``(nB, K)``, ``masked`` ``(M, K')``,
        and the backbone's global CLS tokens ``global_tokens`` ``(2B, D)`` for KoLeo."""
        crops, masks = [batch["global_crops"]], [batch["masks"]]
        if self.n_local_crops > 0:
            crops.append(batch["local_crops"])
            masks.append(None)
        select = [self._patches_read(batch)] + [self._patches_read(None)] * (len(crops) - 1)
        outs = self._student_fwd["backbone"](crops, masks=masks, is_training=True, select_patches=select,
                                             sample_keys=batch["drop_path_keys"][: len(crops)])
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

    def compute_losses(self, batch: dict[str, Any], teacher_temp: float, diagnostics: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (scalar with graph) and the individual losses (detached) for one batch; with ``diagnostics``
        also the collapse statistics (``diag_*``, see :mod:`ssl_distill.train.diagnostics`; a collective)."""
        b = self._to_device(batch)
        cfg = self.cfg
        with self._autocast():
            dino_t, ibot_t, teacher_cls = self._teacher_targets(b, teacher_temp)
            reshard(self.teacher)  # the teacher has no backward to reshard it (FSDP)
            s = self._student_logits(b)
        losses = self._dino_losses(s["local_cls"], s["global_cls"], dino_t)
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
            losses.update(self._diagnostics(losses, dino_t, ibot_t, teacher_cls, s.get("masked")))
        return total, losses

