"""Collapse statistics of self-distillation: is the teacher still teaching the student something?

A DINO/iBOT run can fail without a NaN: the losses stay finite and smooth while the features stop depending on the
image. DINO (Caron et al. 2021, Sec. 5.3 and Fig. 7) names the two ways the teacher's output collapses:

* **uniform**: every image gets the uniform distribution over the ``K`` prototypes. The teacher's mean entropy
  goes to ``ln K``, and the student-teacher cross-entropy sits at ``ln K`` (the DINO loss terms then read
  ``ln K`` times their share: 1.387 and 5.546 for ``K = 1024`` with 2 global + 4 local crops).
* **dominant**: every image gets the same peaked distribution; the entropy of the batch-mean teacher
  distribution goes to 0 and one prototype is used for everything.

Both are the same fact seen from two sides: the teacher's assignment carries no information about the image. The
mutual information between the image and the teacher's prototype, estimated on the batch, is
``I = H(mean_b p_b) - mean_b H(p_b)`` (batch-mean entropy minus mean entropy); it is 0 in both modes and large
in a healthy run. The third signal is the backbone itself: the spread of its L2-normalised CLS tokens across the
batch (SimSiam, Chen & He 2021, Sec. 4.1: about ``1/sqrt(D)`` per dimension for well-spread features, 0 when every
image maps to the same vector), reported here times ``sqrt(D)``, so 1 means "as spread as random directions".

All statistics come from tensors the training step already holds (teacher targets, student logits, teacher CLS
tokens), under ``no_grad``, once per log period, with one all-reduce of one vector: the values are those of the
global batch on any number of ranks. The objective (:mod:`ssl_distill.losses.objective`) computes them; the rule
that watches them over a run is :mod:`ssl_distill.train.diagnostics`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ssl_distill import distributed
from ssl_distill.losses.soft_ce import soft_cross_entropy

__all__ = ["PREFIX", "collapse_statistics", "dino_ce_ratio"]

PREFIX = "diag_"


def _distribution_sums(probs: Tensor) -> Tensor:
    """Sums over the rows of ``(M, K)`` probabilities (float64): ``[sum_m H(p_m), M, sum_m p_m (K), argmax histogram
    (K)]``; summing these vectors over ranks gives those of the global batch."""
    p = probs.detach()
    n_classes = p.shape[-1]
    entropy = -torch.special.xlogy(p, p).sum(-1, dtype=torch.float64)  # (M,), 0 log 0 = 0
    hist = torch.bincount(p.argmax(-1), minlength=n_classes).to(torch.float64)
    head = torch.stack([entropy.sum(), entropy.new_tensor(float(p.shape[0]))])
    return torch.cat([head, p.sum(0, dtype=torch.float64), hist])


def _distribution_stats(sums: Tensor, name: str) -> dict[str, float]:
    """Finish :func:`_distribution_sums`: entropies in units of ``ln K``, mutual information, prototypes in use."""
    n_classes = (sums.numel() - 2) // 2
    n = float(sums[1])
    if n == 0:  # e.g. no masked token in the whole batch
        return {}
    ln_k = math.log(n_classes) if n_classes > 1 else 1.0
    mean_p = sums[2 : 2 + n_classes] / n
    mean_entropy = float(sums[0]) / n
    batch_entropy = float(-torch.special.xlogy(mean_p, mean_p).sum())
    return {
        f"{PREFIX}{name}_teacher_entropy": mean_entropy / ln_k,
        f"{PREFIX}{name}_teacher_batch_entropy": batch_entropy / ln_k,
        f"{PREFIX}{name}_teacher_info": (batch_entropy - mean_entropy) / ln_k,
        f"{PREFIX}{name}_prototypes_used": float((sums[2 + n_classes :] > 0).sum()),
    }


def _feature_sums(features: Tensor) -> Tensor:
    """``(B, D)`` features -> ``[sum_b x_b (D), sum_b x_b**2 (D), B]`` of the L2-normalised rows (float64)."""
    x = torch.nn.functional.normalize(features.detach().to(torch.float64), dim=-1)
    return torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([float(x.shape[0])])])


def _feature_std(sums: Tensor) -> float:
    """Mean over dimensions of the std across the batch of L2-normalised features, times ``sqrt(D)``."""
    dim = (sums.numel() - 1) // 2
    n = float(sums[-1])
    mean = sums[:dim] / n
    var = (sums[dim : 2 * dim] / n - mean * mean).clamp(min=0.0)
    return float(var.sqrt().mean()) * math.sqrt(dim)


@torch.no_grad()
def collapse_statistics(
    dino_targets: Tensor,
    cls_tokens: Tensor,
    ibot_targets: Tensor | None = None,
    ibot_student_logits: Tensor | None = None,
    student_temp: float = 0.1,
) -> dict[str, float]:
    """Collapse statistics of one training step, over the global batch (one all-reduce when distributed).

    Args:
        dino_targets: ``(N, K)`` teacher probabilities of this rank's global crops (rows sum to 1).
        cls_tokens: ``(N, D)`` the teacher backbone's CLS tokens of the same crops.
        ibot_targets: ``(M, K')`` teacher probabilities of this rank's masked patch tokens, or None without iBOT.
        ibot_student_logits: ``(M, K')`` the student's logits of the same tokens (for the cross-entropy).
        student_temp: the student temperature of the iBOT loss.

    Returns:
        ``diag_dino_*`` and ``diag_ibot_*``: ``teacher_entropy`` (mean entropy / ln K), ``teacher_batch_entropy``
        (entropy of the batch-mean distribution / ln K), ``teacher_info`` (their difference: the mutual
        information between image and prototype / ln K), ``prototypes_used`` (distinct arg-max prototypes);
        ``diag_ibot_ce_ratio`` (mean student-teacher cross-entropy per masked token / ln K; 1 = uniform value);
        ``diag_cls_std`` (see :func:`_feature_std`). The DINO cross-entropy ratio comes from the losses
        (:func:`dino_ce_ratio`).
    """
    parts = [_distribution_sums(dino_targets), _feature_sums(cls_tokens)]
    if ibot_targets is not None:
        ce = torch.zeros(2, dtype=torch.float64, device=ibot_targets.device)
        if ibot_targets.shape[0] > 0:
            rows = soft_cross_entropy(ibot_student_logits.detach(), ibot_targets, student_temp)
            ce = torch.stack([rows.sum(dtype=torch.float64), ce.new_tensor(float(rows.shape[0]))])
        parts += [_distribution_sums(ibot_targets), ce]
    sizes = [p.numel() for p in parts]
    reduced = distributed.all_reduce_sum(torch.cat(parts)).cpu().split(sizes)
    stats = _distribution_stats(reduced[0], "dino")
    stats[f"{PREFIX}cls_std"] = _feature_std(reduced[1])
    if ibot_targets is not None:
        stats.update(_distribution_stats(reduced[2], "ibot"))
        ce_sum, n_tokens = reduced[3].tolist()
        if n_tokens > 0:
            stats[f"{PREFIX}ibot_ce_ratio"] = ce_sum / n_tokens / math.log(ibot_targets.shape[-1])
    return stats


def dino_ce_ratio(dino_losses_sum: float | Tensor, n_prototypes: int) -> float | Tensor:
    """The DINO terms' mean student-teacher cross-entropy per crop pair over its uniform value ``ln K``.

    The DINO losses are each a sum of per-pair mean cross-entropies divided by the number of pairs, so their sum
    (``dino_global_crops_loss + dino_local_crops_loss``) is the mean over pairs. 1.0 means the student predicts no
    better than uniform (and a uniform teacher makes it >= 1 whatever the student does).
    """
    return dino_losses_sum / math.log(n_prototypes)
