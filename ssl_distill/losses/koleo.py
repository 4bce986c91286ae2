"""KoLeo regulariser: spread the batch's L2-normalised embeddings by pushing apart nearest neighbours."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]

_PAIRWISE_EPS = 1e-8  # as nn.PairwiseDistance(2, eps=1e-8) in the reference


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator as a loss (Sablayrolles et al. 2019, "Spreading vectors for
    similarity search"), as used on CLS tokens by DINOv2 (Oquab et al. 2023).

    ``forward(x)`` with ``x`` of shape ``(B, D)`` returns the scalar ``-mean_i log(||x_i - x_nn(i)|| + eps)``,
    where rows are L2-normalised and ``nn(i)`` is the other row with the largest dot product.

    Intentional differences from the reference, documented:
      * computed in float32 whatever the input dtype or autocast state (the input is cast to fp32 and
        autocast is disabled for the input's device type); the reference only disables CUDA autocast and
        keeps fp16 inputs in fp16, where ``log`` of tiny distances is badly rounded;
      * the diagonal is excluded with ``-inf`` rather than ``-1``, so a row can never be its own neighbour
        (with ``-1`` an antipodal pair ties with the diagonal);
      * ``B < 2`` raises ``ValueError`` (there is no neighbour to measure).

    Duplicated rows give a finite loss and finite gradients (the distance is at least ``1e-8 * sqrt(D)``,
    as with ``nn.PairwiseDistance``).
    """

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``(B, D)`` embeddings -> scalar float32 loss."""
        if x.ndim != 2:
            raise ValueError(f"KoLeoLoss expects embeddings of shape (B, D), got {tuple(x.shape)}.")
        if x.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs at least 2 samples per batch to find nearest neighbours, got {x.shape[0]}; "
                "use a larger per-rank batch or set the KoLeo loss weight to 0."
            )
        with _autocast_off(x.device.type):
            x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(float("-inf"))
                nearest = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=_PAIRWISE_EPS)
            return -torch.log(distances + eps).mean()
