"""The objectives of distillation from a frozen teacher (``distill.recipe``; the wiring is
:mod:`ssl_distill.train.distill_arch`).

* ``heads`` — the DINOv2 paper's recipe (Oquab et al. 2023, §5, "Model distillation"): the self-distillation
  objective itself, :class:`~ssl_distill.losses.objective.SelfDistillationObjective`, on the frozen teacher's head
  outputs (its centres start from the teacher checkpoint's), with iBOT on *every* patch token of the unmasked
  global crops: :meth:`~ssl_distill.losses.objective.PatchWeights.every_patch`.
* ``features`` — :class:`FeatureDistillationObjective`, for teachers published without heads.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureDistillationObjective"]


class FeatureDistillationObjective(nn.Module):
    """Cosine feature distillation: the summary and spatial feature losses of AM-RADIO (Ranzinger et al. 2024,
    "AM-RADIO: Agglomerative Vision Foundation Model -- Reduce All Domains Into One"), the same global + dense targets
    lightly-train's distillation uses.

    ``1 - cos(student, teacher)`` averaged over the CLS tokens of every crop (``distill_cls_loss``) and over every
    patch token (``distill_patch_loss``), in fp32; the total weighs them with ``cls_weight`` / ``patch_weight``
    (``distill.cls_loss_weight`` / ``distill.patch_loss_weight``). Cosine similarity ignores the teacher's scale, so
    its tokens need no normalisation beyond the backbone's final norm. No state.
    """

    def __init__(self, cls_weight: float = 1.0, patch_weight: float = 1.0) -> None:
        super().__init__()
        self.cls_weight, self.patch_weight = float(cls_weight), float(patch_weight)

    def forward(self, student_cls: Tensor, student_patches: Tensor, teacher_cls: Tensor, teacher_patches: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student tokens already at the teacher's width (projected), rows in the teacher's order: CLS ``(C, D)``
        for ``C`` crops in all, patches ``(P, D)``. Returns the total (with graph) and the individual losses
        (detached, with ``total_loss``)."""
        if student_cls.shape != teacher_cls.shape or student_patches.shape != teacher_patches.shape:
            raise ValueError(f"student tokens {tuple(student_cls.shape)} / {tuple(student_patches.shape)} and teacher "
                             f"tokens {tuple(teacher_cls.shape)} / {tuple(teacher_patches.shape)} must match (project "
                             "the student's to the teacher's width, resample the teacher's patches to its grid).")
        losses = {
            "distill_cls_loss": (1 - F.cosine_similarity(student_cls.float(), teacher_cls.float(), dim=-1)).mean(),
            "distill_patch_loss": (1 - F.cosine_similarity(student_patches.float(), teacher_patches.float(),
                                                           dim=-1)).mean(),
        }
        total = self.cls_weight * losses["distill_cls_loss"] + self.patch_weight * losses["distill_patch_loss"]
        losses = {k: v.detach() for k, v in losses.items()}
        losses["total_loss"] = total.detach()
        return total, losses
