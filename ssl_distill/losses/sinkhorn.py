"""The Sinkhorn-Knopp teacher shared by the DINO and iBOT losses (SwAV, Caron et al. 2020, as used by DINOv2,
Oquab et al. 2023): soft assignments of samples to prototypes with equal prototype marginals over the global batch.

The per-prototype statistics are reduced over all ranks when ``torch.distributed`` is initialised, and computed
locally when it is not. The other teacher, centring + sharpening, is :mod:`ssl_distill.losses.centering`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ssl_distill import distributed

__all__ = ["sinkhorn_knopp"]


def _all_reduce_max_(tensor: Tensor) -> Tensor:
    """In-place element-wise max over ranks (no-op alone). Returns ``tensor``."""
    if distributed.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def _global_row_logsumexp(log_q: Tensor) -> Tensor:
    """``log(sum_b exp(log_q[k, b]))`` over the columns of every rank: ``(K, B_local)`` -> ``(K, 1)``."""
    if log_q.shape[1] > 0:
        row_max = log_q.amax(dim=1, keepdim=True)
    else:  # this rank holds no samples but must still join the collectives
        row_max = log_q.new_full((log_q.shape[0], 1), float("-inf"))
    _all_reduce_max_(row_max)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    row_sum = torch.exp(log_q - row_max).sum(dim=1, keepdim=True)
    distributed.all_reduce_sum(row_sum)
    return row_max + torch.log(row_sum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp soft assignment of samples to prototypes (SwAV, Caron et al. 2020; DINOv2 recipe).

    Args:
        teacher_logits: ``(B_local, K)`` logits of this rank's samples (any float dtype; computed in fp32).
        teacher_temp: temperature dividing the logits before ``exp``.
        n_iterations: number of (prototype, sample) normalisation rounds; DINOv2 uses 3.

    Returns:
        ``(B_local, K)`` float32 assignments; every row sums to 1 (the last step normalises samples).

    Same algorithm as the DINOv2 reference (``Q = exp(logits / temp)``, then ``n_iterations`` rounds of
    "normalise each prototype over the global batch, normalise each sample over prototypes"), with one
    intentional difference: it runs in the log domain, using a stabilised log-sum-exp whose per-prototype
    maximum and sum are all-reduced (MAX, then SUM) across ranks. Subtracting a maximum cancels in every
    normalisation, so the result equals the reference up to float rounding wherever the reference is finite,
    and stays finite where the reference overflows (``exp`` of large ``logits / temp`` gives inf/NaN) or
    underflows (a prototype or a sample whose entries all round to 0 gives 0/0). A single global max
    subtraction before ``exp`` would fix the overflow but not the underflow. The reference's global sample count
    ``B`` (DINO: ``B_local * world_size``; iBOT: the all-reduced number of masked tokens) is not needed: each of its
    divisions by ``B`` (and by ``K`` and the total mass) is a uniform factor that the next normalisation or the
    final ``Q *= B`` undoes.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(
            f"sinkhorn_knopp expects teacher logits of shape (B, K), got {tuple(teacher_logits.shape)}; "
            "flatten the leading dimensions first."
        )
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}.")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}.")
    log_q = (teacher_logits.float() / teacher_temp).t()  # (K, B_local)
    for _ in range(n_iterations):
        log_q = log_q - _global_row_logsumexp(log_q)  # prototypes: global over ranks
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)  # samples: local
    return torch.exp(log_q).t()
