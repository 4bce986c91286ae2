"""The self-distillation objective of DINOv2 as one object: teacher targets, crop pairing, DINO + iBOT + KoLeo with
their weights, the per-token iBOT weights, and the collapse statistics.

The recipe is DINOv2's (Oquab et al. 2023, ``ssl_meta_arch.py``): the teacher sees the two global crops; student
global crop A is matched with teacher crop B and vice versa; every local crop is matched with both teacher crops;
the DINO terms (DINO, Caron et al. 2021) are divided by their count; iBOT (Zhou et al. 2022) compares student and
teacher on the patch tokens the student did not see, each image weighted by its number of masked tokens; KoLeo
(Sablayrolles et al. 2019) spreads the student's global CLS tokens, per global crop. The teacher's outputs are
centred and sharpened (an EMA centre per loss, the state this object carries into checkpoints) or Sinkhorn-Knopp'ed
(SwAV, Caron et al. 2020), in fp32.

Differences from the reference, all so that a run gives the same losses on any number of ranks:

* KoLeo runs on each global crop's CLS tokens gathered from all ranks (with gradient), not on each rank's share.
* The iBOT centre is the global mean of the masked teacher tokens (``update_center_masked``), not the mean of
  per-rank means (the reference, too, slices its teacher outputs to the real masked tokens first).
* With ``n_local_crops=0`` the DINO terms are divided by 2 (their count), not 3.

The training architectures (:mod:`ssl_distill.train.meta_arch`, :mod:`ssl_distill.train.distill_arch`) run the
backbones and heads and hand this object the logits: :meth:`SelfDistillationObjective.targets` on the teacher's,
then the object itself on the student's. The distillation objectives are :mod:`ssl_distill.losses.distillation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ssl_distill import distributed
from ssl_distill.losses.collapse import collapse_statistics, dino_ce_ratio
from ssl_distill.losses.dino import DINOLoss
from ssl_distill.losses.ibot import iBOTPatchLoss
from ssl_distill.losses.koleo import KoLeoLoss

__all__ = ["CENTERINGS", "N_GLOBAL_CROPS", "PatchWeights", "SelfDistillationObjective", "StudentOutputs",
           "TeacherTargets"]

N_GLOBAL_CROPS = 2
CENTERINGS = ("centering", "sinkhorn_knopp")


class TeacherTargets(NamedTuple):
    """The teacher's side of one step (no gradient)."""

    dino: Tensor  # (2, B, K) probabilities, crop-swapped: dino[i] is what student global crop i must predict
    ibot: Tensor | None  # (M, K') probabilities of the patch tokens the iBOT term reads; None without iBOT
    cls_tokens: Tensor  # (2B, D) the teacher backbone's CLS tokens, in the same (swapped) order (diagnostics)


class StudentOutputs(NamedTuple):
    """The student's side of one step (with gradient), crop-major as the batch."""

    global_cls: Tensor  # (2B, K) DINO-head logits of the global crops
    local_cls: Tensor | None  # (nB, K) DINO-head logits of the local crops; None without local crops
    global_tokens: Tensor  # (2B, D) the backbone's CLS tokens of the global crops (KoLeo)
    patches: Tensor | None  # (M, K') iBOT-head logits of the patch tokens the iBOT term reads; None without iBOT


class PatchWeights(NamedTuple):
    """Which patch tokens the iBOT term reads and what each weighs: ``masks`` ``(B, N)`` bool over the global crops'
    tokens (``M`` True, row-major the order of the iBOT rows), ``weights`` ``(M,)``."""

    masks: Tensor
    weights: Tensor

    @classmethod
    def every_patch(cls, n_images: int, n_patches: int, device: torch.device | str) -> PatchWeights:
        """Every token of every image, each weighing ``1 / n_patches`` (distillation: no masking)."""
        masks = torch.ones(n_images, n_patches, dtype=torch.bool, device=device)
        return cls(masks, torch.full((n_images * n_patches,), 1.0 / n_patches, device=device))


class SelfDistillationObjective(nn.Module):
    """DINO + iBOT + KoLeo over the crops of one step (see the module docstring).

    Args:
        dino_prototypes: ``K``, the DINO head's output size.
        ibot_prototypes: ``K'``, the output size of the head the iBOT logits come from.
        n_local_crops: local crops per image (the DINO term count and the chunks of ``local_cls``).
        dino_weight, ibot_weight, koleo_weight: each term's weight in the total (``dino.loss_weight``,
            ``ibot.loss_weight``, ``dino.koleo_loss_weight``); KoLeo is skipped at weight 0.
        centering: ``"centering"`` (EMA centre + sharpening) or ``"sinkhorn_knopp"`` (``train.centering``).

    The state (``state_dict``) is the two centres: ``dino_loss.center`` ``(1, K)``, ``ibot_patch_loss.center``
    ``(1, 1, K')``, kept whichever teacher is used.
    """

    def __init__(self, dino_prototypes: int, ibot_prototypes: int, n_local_crops: int, *, dino_weight: float = 1.0,
                 ibot_weight: float = 1.0, koleo_weight: float = 0.0, centering: str = "centering") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS} (train.centering), got '{centering}'.")
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}.")
        self.dino_loss = DINOLoss(dino_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes)
        self.koleo_loss = KoLeoLoss()
        self.n_local_crops = n_local_crops
        self.dino_weight, self.ibot_weight, self.koleo_weight = float(dino_weight), float(ibot_weight), float(
            koleo_weight)
        self.centering = centering

    # ---------------------------------------------------------------------------------------------- teacher
    @staticmethod
    def pair(global_rows: Tensor) -> Tensor:
        """Teacher rows ``(2B, ...)`` of the global crops in the order the student's meet them: crop B's rows,
        then crop A's. Rows are independent through a head, so the cheaper side of it may be swapped."""
        first, second = global_rows.chunk(N_GLOBAL_CROPS)
        return torch.cat((second, first))

    @torch.no_grad()
    def targets(self, cls_logits: Tensor, patch_logits: Tensor | None, teacher_temp: float, cls_tokens: Tensor
                ) -> TeacherTargets:
        """Teacher targets from head outputs: DINO ``(2, B, K)`` from CLS logits ``(2B, K)`` (already paired,
        :meth:`pair`) and iBOT ``(M, K')`` from patch logits ``(M, K')`` (or None), by centring (the centres'
        EMA update is started, to be applied at the next call) or Sinkhorn-Knopp, in fp32. ``cls_tokens``
        ``(2B, D)``: the teacher's CLS tokens in the order of ``cls_logits``, kept for the diagnostics."""
        cls_logits = cls_logits.float()
        patch_logits = patch_logits.float() if patch_logits is not None else None
        ibot_t = None
        if self.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            if patch_logits is not None:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_patch_loss.update_center_masked(patch_logits)
        else:  # sinkhorn_knopp
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            if patch_logits is not None:
                ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
        return TeacherTargets(dino_t.view(N_GLOBAL_CROPS, -1, dino_t.shape[-1]), ibot_t, cls_tokens)

    # ----------------------------------------------------------------------------------------------- losses
    def forward(self, student: StudentOutputs, targets: TeacherTargets, patch_weights: PatchWeights | None = None,
                *, diagnostics: bool = False, gather_group: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss (scalar with graph) and the individual losses (detached, with ``total_loss``).

        ``patch_weights``: the iBOT tokens and their weights (the batch's masks and ``masks_weight``, or
        :meth:`PatchWeights.every_patch`), needed when ``targets.ibot`` is given. ``diagnostics``: add the
        collapse statistics (``diag_*``; a collective that reads values on the host). ``gather_group``: the
        process group of KoLeo's all-gather (default: the world).
        """
        losses = self.dino_terms(student.local_cls, student.global_cls, targets.dino)
        total = self.dino_weight * sum(losses.values())
        if self.koleo_weight > 0:
            losses["koleo_loss"] = self.koleo_weight * self.koleo(student.global_tokens, gather_group)
            total = total + losses["koleo_loss"]
        if targets.ibot is not None:
            if student.patches is None or patch_weights is None:
                raise ValueError("the iBOT term needs the student's patch logits and the patch weights.")
            losses["ibot_loss"] = self.ibot_patch_loss(student.patches.float(), targets.ibot, *patch_weights)
            total = total + self.ibot_weight * losses["ibot_loss"]
        losses = {k: v.detach() for k, v in losses.items()}
        losses["total_loss"] = total.detach()
        if diagnostics:
            losses.update(self.diagnostics(losses, student, targets))
        return total, losses

    def dino_terms(self, local_cls: Tensor | None, global_cls: Tensor, dino_t: Tensor) -> dict[str, Tensor]:
        """DINO terms, each divided by their number: local crops against both teacher crops, and both global
        pairs at once — student ``(2B, K)`` rows against the swapped teacher rows (x2 = the sum of 2 means)."""
        n_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * self.n_local_crops
        losses: dict[str, Tensor] = {}
        if self.n_local_crops > 0:
            losses["dino_local_crops_loss"] = (
                self.dino_loss(local_cls.float().chunk(self.n_local_crops), list(dino_t)) / n_terms
            )
        losses["dino_global_crops_loss"] = (
            self.dino_loss([global_cls.float()], [dino_t.flatten(0, 1)]) * N_GLOBAL_CROPS / n_terms
        )
        return losses

    def koleo(self, global_tokens: Tensor, group: Any = None) -> Tensor:
        """KoLeo on each global crop's student CLS tokens ``(2B, D)``, gathered from all ranks (with gradient)."""
        terms = []
        for chunk in global_tokens.chunk(N_GLOBAL_CROPS):  # never between two crops of one image
            if distributed.get_world_size() > 1:
                chunk = distributed.all_gather_with_grad(chunk, group=group)
            terms.append(self.koleo_loss(chunk))
        return sum(terms)

    @torch.no_grad()
    def diagnostics(self, losses: Mapping[str, Tensor], student: StudentOutputs, targets: TeacherTargets
                    ) -> dict[str, Tensor]:
        """Collapse statistics (:mod:`ssl_distill.losses.collapse`) from tensors the step already holds (no extra
        forward): the teacher's targets and CLS tokens, the student's iBOT logits of the same tokens, and the
        DINO losses. 0-dim tensors on the targets' device."""
        stats = collapse_statistics(targets.dino.flatten(0, 1), targets.cls_tokens, targets.ibot, student.patches,
                                    self.ibot_patch_loss.student_temp)
        out = {k: torch.tensor(v, device=targets.dino.device) for k, v in stats.items()}
        dino_sum = sum(v for k, v in losses.items() if k.startswith("dino_"))
        out["diag_dino_ce_ratio"] = dino_ce_ratio(dino_sum, targets.dino.shape[-1])
        return out

    # ----------------------------------------------------------------------------------------------- state
    @torch.no_grad()
    def load_centres(self, state: Mapping[str, Tensor]) -> list[str]:
        """Copy the centres of a state dict in this object's keys (``dino_loss.center``,
        ``ibot_patch_loss.center``) where present and of the same shape; returns the keys taken."""
        taken = []
        for key, mine in self.state_dict(keep_vars=True).items():
            theirs = state.get(key)
            if theirs is not None and theirs.shape == mine.shape:
                mine.copy_(theirs)
                taken.append(key)
        return taken
