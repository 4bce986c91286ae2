"""iBOT masked-patch loss: the student predicts the teacher's soft targets on masked patch tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_distill.losses.centering import CenteredTeacherLoss
from ssl_distill.losses.sinkhorn import sinkhorn_knopp
from ssl_distill.losses.soft_ce import soft_cross_entropy

__all__ = ["iBOTPatchLoss"]


def _as_bool_mask(masks: Tensor) -> Tensor:
    if masks.ndim != 2:
        raise ValueError(f"student_masks_flat must have shape (B, N), got {tuple(masks.shape)}.")
    return masks if masks.dtype == torch.bool else masks.bool()


class iBOTPatchLoss(CenteredTeacherLoss):
    """Masked image modelling loss of iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online
    Tokenizer") as used in DINOv2 (Oquab et al. 2023), with centring (DINO, Caron et al. 2021) or
    Sinkhorn-Knopp (SwAV, Caron et al. 2020) teachers.

    Shapes: ``B`` images, ``N`` patch tokens each, ``K = patch_out_dim`` prototypes, ``M`` masked tokens in
    total; ``student_masks_flat`` is ``(B, N)`` bool. The ``center`` buffer has shape ``(1, 1, K)``.

    Each image's loss is the mean over its masked tokens; the batch loss averages images, counting images
    without masked tokens as 0 (as the reference does). It is computed on the masked tokens only, with the per-token
    weights the collator built (``masks_weight``, :mod:`ssl_distill.data.collate`), and the centre from the masked
    tokens (:meth:`update_center_masked`). The reference's full-grid ``forward`` is not offered (nothing trains on
    full grids); its ``forward_masked`` is an alias of :meth:`forward`. The centre update is lazy, see
    :class:`~ssl_distill.losses.centering.CenteredTeacherLoss`; everything also works without
    ``torch.distributed``.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        if patch_out_dim < 1:
            raise ValueError(f"patch_out_dim must be >= 1, got {patch_out_dim}.")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}.")
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((logits - center) / teacher_temp)``: ``(B, N, K)`` or ``(M, K)`` -> same shape.

        Applies any pending centre update first. (The reference returns ``(1, M, K)`` for ``(M, K)`` input.)
        """
        return self._centered_softmax(teacher_patch_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets for this rank's masked tokens: ``(M_local, K)`` -> ``(M_local, K)`` fp32.

        Ranks may hold different numbers of tokens (none, too). The reference also takes the number of masked
        tokens, which the result does not depend on (see :func:`~ssl_distill.losses.sinkhorn.sinkhorn_knopp`).
        """
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center_masked(self, masked_teacher_logits: Tensor) -> None:
        """Record the masked tokens ``(M, K)`` of this rank for a centre update with their **global** mean.

        Sums and counts are reduced over ranks, so the centre is the same whatever the number of ranks and however
        the masked tokens are spread over them (the reference averages per-rank means instead).
        """
        if masked_teacher_logits.ndim != 2 or masked_teacher_logits.shape[-1] != self.patch_out_dim:
            raise ValueError(
                f"iBOTPatchLoss.update_center_masked expects (M, {self.patch_out_dim}) logits, got "
                f"{tuple(masked_teacher_logits.shape)}."
            )
        x = masked_teacher_logits.detach().to(self.center.dtype)
        self._start_center_update(x.sum(0, keepdim=True), x.shape[0], sum_counts=True)

    def _token_log_likelihood(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """``sum_k t * log_softmax(s / student_temp)`` over the last dim: ``(..., K)`` -> ``(...)``."""
        if student_logits.shape != teacher_probs.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                f"{tuple(teacher_probs.shape)} must have the same shape."
            )
        rows = soft_cross_entropy(student_logits.flatten(0, -2), teacher_probs.flatten(0, -2), self.student_temp)
        return -rows.view(student_logits.shape[:-1])

    def forward(
        self, student_logits: Tensor, teacher_probs: Tensor, student_masks_flat: Tensor, masks_weight: Tensor
    ) -> Tensor:
        """Loss on masked tokens only, gathered as ``tokens[student_masks_flat]`` (row-major order).

        Args:
            student_logits: ``(M, K)`` student logits of the masked tokens.
            teacher_probs: ``(M, K)`` teacher targets of the same tokens.
            student_masks_flat: ``(B, N)`` bool masks (``M`` of them True).
            masks_weight: ``(M,)`` per-token weights, ``1 / masked tokens of its image`` for the recipe's weighting
                (the batch's ``masks_weight``).

        Returns:
            Scalar ``-sum_m w_m * sum_k t log_softmax(s / temp) / B``: each image's mean over its masked
            tokens, averaged over all ``B`` images (the reference's weighting).
        """
        masks = _as_bool_mask(student_masks_flat)
        loss = self._token_log_likelihood(student_logits, teacher_probs)  # (M,)
        if loss.shape != masks_weight.shape:
            raise ValueError(
                f"{loss.shape[0]} masked-token losses but {masks_weight.shape[0]} weights: pass the logits of "
                "exactly the masked tokens (student_masks_flat.sum() rows) and one weight per token."
            )
        return -(loss * masks_weight).sum() / masks.shape[0]

    # The reference's name (DINOv2 ``iBOTPatchLoss.forward_masked``; its ``n_masked_patches`` is not needed here):
    # the same code path, for code written against the reference.
    forward_masked = forward
