"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018; DINO, Caron et al. 2021).

For a query ``q`` and train features ``x_i`` (all L2-normalised), the ``k`` most similar train samples by cosine
similarity ``s_i = q . x_i`` vote for their class with weight ``exp(s_i / T)``; classes are ranked by total vote.
One neighbour search (the largest ``k``) serves every ``k``: ``topk`` returns neighbours sorted by similarity,
so the first ``k`` of the ``max(k)`` nearest are the ``k`` nearest.

Memory stays bounded: queries go in batches of ``query_batch`` and train features are scanned in chunks of
``train_chunk``, keeping a running top-``max(k)``; no ``N_query x N_train`` similarity matrix is ever built.
Across ranks every rank holds all train features and classifies its slice of the queries; correct counts are
summed, so the result equals the single-process one.
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

logger = logging.getLogger(__name__)


def topk_neighbours(
    queries: Tensor, train: Tensor, k: int, train_chunk: int = 65536, train_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest similarities ``queries @ train.T`` per query, scanning ``train`` in chunks.

    Args: queries ``(Q, D)``, train ``(N, D)`` (both already normalised, or ``train_scale`` ``(N,)`` multiplies
    column ``i`` of the similarities, e.g. ``1 / |train_i|``, so no normalised copy of ``train`` is needed).
    Returns ``(sims (Q, k), index (Q, k))``, sorted by decreasing similarity. ``k`` is clipped to ``N``.
    """
    k = min(k, train.shape[0])
    best_sim = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_idx = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, train.shape[0], train_chunk):
        chunk = train[start : start + train_chunk].to(queries.dtype)
        sims = queries @ chunk.T
        if train_scale is not None:
            sims *= train_scale[start : start + chunk.shape[0]]
        idx = torch.arange(start, start + chunk.shape[0], device=queries.device).expand_as(sims)
        sims, idx = torch.cat([best_sim, sims], dim=1), torch.cat([best_idx, idx], dim=1)
        best_sim, pos = sims.topk(min(k, sims.shape[1]), dim=1)
        best_idx = idx.gather(1, pos)
    return best_sim, best_idx


def _inverse_row_norms(x: Tensor, eps: float = 1e-12, chunk: int = 65536) -> Tensor:
    """``1 / max(|x_i|, eps)`` per row in float32 (as ``F.normalize``), computed chunk by chunk."""
    norms = torch.cat([x[i : i + chunk].float().norm(dim=1) for i in range(0, x.shape[0], chunk)])
    return 1.0 / norms.clamp_min(eps)


def weighted_votes(sims: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores ``(Q, C)``: ``sum over neighbours of exp(sim / T)`` into each neighbour's class.

    ``sims (Q, k)`` and ``labels (Q, k)`` are the neighbours' similarities and classes.
    """
    votes = sims.new_zeros((sims.shape[0], num_classes))
    return votes.scatter_add_(1, labels, torch.exp(sims / temperature))


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
) -> dict[int, Tensor]:
    """Per ``k``: ``tensor([top1_correct, top5_correct])`` over these queries (top-5 counts 0 when ``C < 5``).

    A top-5 hit needs the true class among the 5 highest-voted classes *and* at least one vote (with ``k < 5``
    fewer than 5 classes get votes; the reference implementations then count arbitrary zero-vote classes).

    Features are L2-normalised here; ``train_features (N, D)``, ``test_features (Q, D)``, labels int64. The train
    matrix is never copied (its inverse row norms scale the similarities), so peak memory stays near the size of
    the features plus one ``query_batch x train_chunk`` block.
    """
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    train_scale = _inverse_row_norms(train_features)
    test = F.normalize(test_features.float(), dim=1)
    max_k = max(ks)
    counts = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, test.shape[0], query_batch):
        q, target = test[start : start + query_batch], test_labels[start : start + query_batch]
        sims, idx = topk_neighbours(q, train_features, max_k, train_chunk, train_scale)
        neighbour_labels = train_labels[idx]
        for k in ks:
            votes = weighted_votes(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
            top_votes, ranked = votes.topk(min(5, num_classes), dim=1)
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
) -> dict[int, dict[str, float]]:
    """Weighted k-NN top-1 (and top-5 when there are >= 5 classes) accuracy in percent, for every ``k``.

    Every rank passes the same (full) tensors; each classifies its slice of the queries and the correct counts
    are summed over ranks, so every rank returns the single-process result.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    mine = shard_range(test_features.shape[0], get_rank(), get_world_size())
    counts = knn_correct_counts(
        train_features, train_labels, test_features[mine.start : mine.stop], test_labels[mine.start : mine.stop],
        ks, temperature, num_classes, query_batch, train_chunk,
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
                       ks=ks, temperature=temperature, num_classes=len(train.classes))
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
) -> dict[str, dict[str, dict[str, float]]]:
    """k-NN accuracy for every ``n_per_class`` (-1 = the full train set) and ``k``, averaged over ``n_tries`` draws.

    Returns ``{"all" | "<n>-shot": {"k=<k>": {"top1", "top1_std", ["top5", "top5_std"]}}}`` (percent; std over
    tries, 0 for one try). Try ``t`` draws its subset with seed ``t``. A ``k`` larger than the (subset's) train set
    is reported under the ``k`` actually used, the train set's size, with ``"k_requested"``, and warned about.
    """
    num_classes = int(train_labels.max()) + 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in n_per_class_list:
        tries = 1 if n < 0 else n_tries
        subsets = [few_shot_indices(train_labels, n, seed=t) for t in range(tries)]
        used = _usable_ks(ks, min(len(idx) for idx in subsets), "all" if n < 0 else f"{n}-shot")
        runs = [knn_accuracy(train_features[idx], train_labels[idx], test_features, test_labels, sorted(set(used)),
                             temperature, num_classes, train_chunk=train_chunk) for idx in subsets]
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
