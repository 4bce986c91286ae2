"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018; DINO, Caron et al. 2021).

For a query ``q`` and train features ``x_i`` (all L2-normalised), the ``k`` most similar train samples by cosine
similarity ``s_i = q . x_i`` vote for their class with weight ``exp(s_i / T)``; classes are ranked by total vote.
One neighbour search (the largest ``k``) serves every ``k``: neighbours come sorted, so the first ``k`` of the
``max(k)`` nearest are the ``k`` nearest.

The result is a function of the feature values alone, the same on the CPU and on CUDA, whatever the chunk sizes,
the input dtype or the global matmul precision flags:

* **Similarities in float64.** A product of two float32 (or bf16/fp16) numbers is exact in float64, so ranking errors
  are ~1e-16, far below the ~6e-8 resolution of float32 features. A float32 similarity cannot rank them: the CLS
  features of a randomly initialised ViT are collinear to ~1e-9 (cosine 0.999999998 ... 0.99999999999), so every
  train sample ties with every other within float32 rounding and ``topk`` then picks by accident of kernel and tie
  order -- 2 of 50 k=1 decisions flipped between an H200 and the CPU. float64 matmuls never use TF32 or reduced
  precision, so ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.set_float32_matmul_precision`` do not apply
  (and the float32 scan below runs with them forced to IEEE float32).
* **Snapped to a grid of 2^-32 (~2.3e-10)** before ranking. Identical train features do *not* get identical float64
  similarities from a matmul: a row's result depends on its position in the call (measured: 1 ulp, 2.2e-16, between
  two copies of a row), so an exact tie would be decided by that noise. On the grid a tie splits only when a grid
  boundary falls inside the ~1e-16 noise (probability ~1e-6 per tie), while the grid stays 256x finer than float32
  resolution (2^-24): similarities closer than 2.3e-10 become ties, but no such difference is reproducible anyway
  (the same image through the backbone on another device moves its similarities by ~1e-7).
* **Exact ties go to the lowest train index**, the order ``(similarity desc, index asc)``, independent of how
  ``topk`` orders equal values on a device. Classes with equal votes go to the lowest class index.
* **Votes are summed neighbour by neighbour in rank order** (no atomic ``scatter_add``, whose order varies on CUDA).

What this cannot do is make *different* features give the same neighbours: features that differ by ~1e-6 between
devices (summation order in the backbone) flip any neighbour whose similarity margin is smaller than that. Rounding
similarities (or features) to a coarser grid before ranking does not cure it: two values a distance ``d`` apart still
straddle a grid boundary with probability ~``d / grid``, so flips only get rarer, while a grid coarse enough to matter
creates false ties that are then decided by index instead of by similarity. The 2^-32 grid above is for float64
noise only, far below any feature difference.

The neighbour search (float32 scan, exact float64 re-rank, the proof and the fallback, bounded memory) is
:mod:`ssl_distill.eval.knn_search`. Across ranks every rank holds all train features and classifies its slice of the
queries; correct counts are summed, so the result equals the single-process one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_distill.distributed import all_reduce_sum, get_rank, get_world_size
from ssl_distill.eval.features import extract_features, shard_range
from ssl_distill.eval.knn_search import bank_range, row_norms, search

logger = logging.getLogger(__name__)



def weighted_votes(sims: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores ``(Q, C)`` float64: ``sum over neighbours of exp(sim / T)`` into each neighbour's class.

    ``sims (Q, k)`` and ``labels (Q, k)`` are the neighbours' similarities and classes, nearest first. The sum runs
    neighbour by neighbour in that order (each step adds to one class per row), so it is the same on every device;
    an atomic ``scatter_add_`` on CUDA adds in a varying order.
    """
    return _cumulative_votes(sims, labels, num_classes, temperature, [sims.shape[1]])[sims.shape[1]]


def _cumulative_votes(sims: Tensor, labels: Tensor, num_classes: int, temperature: float,
                      ks: Sequence[int]) -> dict[int, Tensor]:
    """``{k: weighted_votes of the first k neighbours}`` for every ``k`` in ``ks``, in one pass over the columns."""
    weights = torch.exp(sims.double() / temperature)
    votes = weights.new_zeros((sims.shape[0], num_classes))
    rows = torch.arange(sims.shape[0], device=sims.device)
    out = {}
    for j in range(max(ks)):
        votes.index_put_((rows, labels[:, j]), weights[:, j], accumulate=True)
        if j + 1 in ks:
            out[j + 1] = votes.clone()
    return out


def _check_finite(features: Tensor, what: str) -> None:
    if features.is_floating_point() and not bool(torch.isfinite(features).all()):
        raise ValueError(f"k-NN: the {what} features contain NaN or inf; the backbone produced non-finite features "
                         "(check the checkpoint and run the evaluation with --autocast none)")


def knn_correct_counts(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    query_batch: int = 256,
    train_chunk: int = 65536,
    device: torch.device | str | None = None,
) -> dict[int, Tensor]:
    """Per ``k``: ``tensor([top1_correct, top5_correct])`` over these queries (top-5 counts 0 when ``C < 5``).

    A top-5 hit needs the true class among the 5 highest-voted classes *and* at least one vote (with ``k < 5``
    fewer than 5 classes get votes; the reference implementations then count arbitrary zero-vote classes).

    Features are L2-normalised here (in float64); ``train_features (N, D)``, ``test_features (Q, D)`` of any float
    dtype, labels int64. The search runs on ``device`` (default: ``test_features``' device); the train matrix is
    moved there once in its own dtype and never normalised as a copy (its inverse row norms scale the similarities),
    so peak memory stays near the size of the features plus one ``query_batch x train_chunk`` float32 block (and a
    float32 copy of one train chunk when the features are not float32). The counts (CPU int64) do not depend on the
    device (see the module docstring).
    """
    _check_finite(test_features, "test")
    device = torch.device(device) if device is not None else test_features.device
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    norms = row_norms(train_features)
    if not bool(torch.isfinite(norms).all()):  # finite norms prove finite features, without a pass over them
        _check_finite(train_features, "train")
    train_scale = 1.0 / norms.clamp_min(1e-12)  # = knn_search._inverse_row_norms, as F.normalize
    bank = bank_range(norms, train_scale)
    max_k = max(ks)
    counts = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, test_features.shape[0], query_batch):
        q = F.normalize(test_features[start : start + query_batch].to(device, torch.float64), dim=1)
        target = test_labels[start : start + query_batch].to(device)
        sims, idx = search(q, train_features, max_k, train_chunk, train_scale, bank)
        all_votes = _cumulative_votes(sims, train_labels[idx], num_classes, temperature,
                                      sorted({min(k, sims.shape[1]) for k in ks}))
        for k in ks:
            votes = all_votes[min(k, sims.shape[1])]
            # stable: among classes with equal votes the lowest class index ranks first
            top_votes, ranked = votes.sort(dim=1, descending=True, stable=True)
            top_votes, ranked = top_votes[:, :5], ranked[:, :5]
            hit = (ranked == target[:, None]) & (top_votes > 0)  # a class no neighbour voted for never counts
            counts[k][0] += int(hit[:, 0].sum())
            counts[k][1] += int(hit.any(dim=1).sum()) if num_classes >= 5 else 0
    return counts


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    query_batch: int = 256,
    train_chunk: int = 65536,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN top-1 (and top-5 when there are >= 5 classes) accuracy in percent, for every ``k``.

    Every rank passes the same (full) tensors; each classifies its slice of the queries and the correct counts
    are summed over ranks, so every rank returns the single-process result. The search runs on ``device``
    (default: ``test_features``' device) and gives the same result on any device (module docstring).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    mine = shard_range(test_features.shape[0], get_rank(), get_world_size())
    counts = knn_correct_counts(
        train_features, train_labels, test_features[mine.start : mine.stop], test_labels[mine.start : mine.stop],
        ks, temperature, num_classes, query_batch, train_chunk, device,
    )
    total = test_features.shape[0]
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        c = all_reduce_sum(counts[k].clone())
        results[k] = {"top1": 100.0 * int(c[0]) / total}
        if num_classes >= 5:
            results[k]["top5"] = 100.0 * int(c[1]) / total
    return results


def backbone_knn_top1(
    model: torch.nn.Module, train: Any, val: Any, ks: Sequence[int], temperature: float = 0.07,
    batch_size: int = 256, device: torch.device | None = None, desc: str = "k-NN",
) -> dict[int, float]:
    """Weighted k-NN top-1 (%) per ``k`` of ``model``'s last-block CLS features: ``train`` is the memory bank,
    ``val`` the queries (labelled datasets with ``.classes``). Used by the demo and the in-training monitor."""
    feats = [extract_features(model, ds, batch_size, n_last_blocks=1, device=device, desc=f"{desc} {name}")
             for ds, name in ((train, "train"), (val, "val"))]
    acc = knn_accuracy(feats[0]["cls"][:, -1], feats[0]["labels"], feats[1]["cls"][:, -1], feats[1]["labels"],
                       ks=ks, temperature=temperature, num_classes=len(train.classes), device=device)
    return {k: acc[k]["top1"] for k in ks}


def few_shot_indices(labels: Tensor, n_per_class: int, seed: int) -> Tensor:
    """Indices of ``n_per_class`` samples of each class (all of a smaller class), drawn with ``seed``; sorted.

    ``n_per_class = -1`` means every sample. The draw depends only on ``labels`` and ``seed``, so all ranks agree.
    """
    if n_per_class < 0:
        return torch.arange(labels.shape[0])
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(idx.shape[0], generator=gen)[:n_per_class]])
    return torch.cat(chosen).sort().values


def knn_few_shot(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    train_chunk: int = 65536,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """k-NN accuracy for every ``n_per_class`` (-1 = the full train set) and ``k``, averaged over ``n_tries`` draws.

    Returns ``{"all" | "<n>-shot": {"k=<k>": {"top1", "top1_std", ["top5", "top5_std"]}}}`` (percent; std over
    tries, 0 for one try). Try ``t`` draws its subset with seed ``t``. A ``k`` larger than the (subset's) train set
    is reported under the ``k`` actually used, the train set's size, with ``"k_requested"``, and warned about.
    The search runs on ``device`` (default: ``test_features``' device).
    """
    num_classes = int(train_labels.max()) + 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in n_per_class_list:
        tries = 1 if n < 0 else n_tries
        subsets = [few_shot_indices(train_labels, n, seed=t) for t in range(tries)]
        used = _usable_ks(ks, min(len(idx) for idx in subsets), "all" if n < 0 else f"{n}-shot")
        runs = [knn_accuracy(train_features[idx], train_labels[idx], test_features, test_labels, sorted(set(used)),
                             temperature, num_classes, train_chunk=train_chunk, device=device)
                for idx in subsets]
        per_k: dict[str, dict[str, float]] = {}
        for k, k_used in zip(ks, used):
            entry: dict[str, float] = {}
            for metric in runs[0][k_used]:
                values = torch.tensor([r[k_used][metric] for r in runs], dtype=torch.float64)
                entry[metric] = float(values.mean())
                entry[f"{metric}_std"] = float(values.std(unbiased=False))
            if k_used != k:
                entry["k_requested"] = k
            per_k[f"k={k_used}"] = entry
        out["all" if n < 0 else f"{n}-shot"] = per_k
    return out


def _usable_ks(ks: Sequence[int], n_train: int, what: str) -> list[int]:
    """Each ``k`` capped at the number of train samples, with one warning per capped ``k``."""
    for k in ks:
        if k > n_train:
            logger.warning("k-NN (%s): k=%d is larger than the %d train samples; reporting it as k=%d", what, k,
                           n_train, n_train)
    return [min(k, n_train) for k in ks]
