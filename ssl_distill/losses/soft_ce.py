"""Soft-target cross-entropy ``-sum_k t_k log_softmax(s / temp)_k`` with a fused backward.

Both DINO and iBOT spend most of their non-matmul time here: the student logits have ``K = 65536`` columns, so
every elementwise pass over them is a large memory sweep. Written naively (``s / temp``, ``log_softmax``,
``t * ...``, ``sum``) autograd allocates and sweeps about six ``(M, K)`` buffers; this version allocates one
(the softmax, kept for the backward pass, which turns it into the gradient in place), through the identity

    ``-sum_k t_k log_softmax(z)_k = logsumexp(z) * sum_k t_k - sum_k t_k z_k``,  ``z = s / temp``,

whose gradient is ``(softmax(z) * sum_k t_k - t) / temp``. The result equals the naive formula up to float
rounding, for any non-negative targets (rows need not sum to 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_cross_entropy"]


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``(M, K)`` inputs without an ``(M, K)`` temporary (a batch of 1x1 products)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temp: float) -> Tensor:  # type: ignore[override]
        with torch.autocast(logits.device.type, enabled=False):  # keep the row dot products in full precision
            rows = -_rowdot(targets, logits) / temp
            probs = logits * (1.0 / temp)  # the one (M, K) buffer: z, then softmax(z) in place
            row_max = probs.amax(dim=-1, keepdim=True)
            sums = probs.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            probs.div_(sums)
            t_sum = targets.sum(dim=-1)
            rows += (sums.log_() + row_max).squeeze(-1) * t_sum
        ctx.save_for_backward(probs, targets, t_sum)
        ctx.temp = temp
        return rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        probs, targets, t_sum = ctx.saved_tensors
        # The gradient overwrites the saved softmax: no new (M, K) buffer (a second backward through the same
        # graph is refused by autograd's saved-tensor version check instead of computing garbage).
        grad = probs.mul_(t_sum.unsqueeze(-1)).sub_(targets)
        return grad.mul_((grad_rows / ctx.temp).unsqueeze(-1)), None, None


def soft_cross_entropy(logits: Tensor, targets: Tensor, temp: float = 1.0) -> Tensor:
    """Per-row ``-sum_k targets * log_softmax(logits / temp)``: ``(M, K)``, ``(M, K)`` -> ``(M,)``.

    Computed in float32 whatever the input dtype. Gradients flow to ``logits`` only (targets are teacher
    outputs); see the module docstring for the memory-saving formulation.
    """
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(
            f"soft_cross_entropy expects logits and targets of the same (M, K) shape, got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}."
        )
    if temp <= 0:
        raise ValueError(f"temp must be > 0, got {temp}.")
    return _SoftCrossEntropy.apply(logits.float(), targets.detach().float(), float(temp))
