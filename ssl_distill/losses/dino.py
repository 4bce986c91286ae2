"""DINO loss on the CLS token: cross-entropy between a sharpened teacher and the student over all crop pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssl_distill.losses.centering import CenteredTeacherLoss
from ssl_distill.losses.sinkhorn import sinkhorn_knopp
from ssl_distill.losses.soft_ce import soft_cross_entropy

__all__ = ["DINOLoss"]


class DINOLoss(CenteredTeacherLoss):
    """Self-distillation loss of DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers") with the teachers of DINOv2 (Oquab et al. 2023): centring + sharpening, or Sinkhorn-Knopp
    (SwAV, Caron et al. 2020).

    Shapes: teacher logits ``(B, K)`` with ``K = out_dim``; student logits ``(B, K)`` per crop; teacher
    probabilities ``(B, K)`` per crop. The ``center`` buffer has shape ``(1, K)``.

    Centring follows the reference's lazy update: :meth:`update_center` records the batch sum (all-reduced
    asynchronously when distributed) and the EMA ``center = center * m + mean * (1 - m)`` is applied by the
    next :meth:`softmax_center_teacher` or by :meth:`apply_center_update`. Unlike the reference, everything
    also works in a single process without ``torch.distributed``.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}.")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}.")
        super().__init__((1, out_dim), center_momentum)
        self.out_dim = out_dim
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((teacher_logits - center) / teacher_temp)``: ``(..., K)`` -> ``(..., K)``.

        Applies any pending centre update first.
        """
        return self._centered_softmax(teacher_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets: ``(B_local, K)`` -> ``(B_local, K)`` fp32, rows summing to 1.

        ``B = B_local * world_size`` (every rank holds the same number of rows). See
        :func:`ssl_distill.losses.sinkhorn.sinkhorn_knopp` for the overflow-safe difference to the reference.
        """
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Record ``sum(teacher_logits, dim=0)`` of a ``(B, K)`` batch for the lazy EMA centre update."""
        if teacher_logits.ndim != 2 or teacher_logits.shape[-1] != self.out_dim:
            raise ValueError(
                f"DINOLoss.update_center expects teacher logits of shape (B, {self.out_dim}), got "
                f"{tuple(teacher_logits.shape)}; flatten the crops into the batch dimension first."
            )
        x = teacher_logits.detach().to(self.center.dtype)
        self._start_center_update(torch.sum(x, dim=0, keepdim=True), len(x))

    def forward(
        self, student_logits_list: Sequence[Tensor] | Tensor, teacher_probs_list: Sequence[Tensor] | Tensor
    ) -> Tensor:
        """``-sum_s sum_t mean_b sum_k t * log_softmax(s / student_temp)`` over all (student, teacher) pairs.

        Args:
            student_logits_list: student crops, each ``(B, K)`` (a list, or a tensor ``(n_s, B, K)``).
            teacher_probs_list: teacher targets, each ``(B, K)`` (a list, or a tensor ``(n_t, B, K)``).

        Returns:
            Scalar sum over pairs (the reference does not exclude same-view pairs; the caller divides by the
            number of pairs).
        """
        if len(student_logits_list) == 0 or len(teacher_probs_list) == 0:
            raise ValueError("DINOLoss needs at least one student and one teacher crop.")
        for t in teacher_probs_list:
            if t.shape != teacher_probs_list[0].shape:
                raise ValueError(f"teacher probabilities {tuple(t.shape)} and {tuple(teacher_probs_list[0].shape)} "
                                 "must have the same (B, K) shape.")
        # The sum over (student, teacher) pairs is linear in the teacher, so each student meets the sum of the
        # teachers once: one cross-entropy per student crop instead of one per pair.
        teachers = teacher_probs_list[0]
        if len(teacher_probs_list) > 1:
            teachers = torch.stack(list(teacher_probs_list)).sum(0)
        total = None
        for s in student_logits_list:
            if teachers.shape != s.shape:
                raise ValueError(
                    f"student logits {tuple(s.shape)} and teacher probabilities {tuple(teachers.shape)} must have "
                    "the same (B, K) shape."
                )
            loss = soft_cross_entropy(s, teachers, self.student_temp).mean()
            total = loss if total is None else total + loss
        assert total is not None
        return total
