"""Weighted k-NN against an explicit brute-force loop, few-shot draws, and 2-process == 1-process."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_distributed

from ssl_distill.eval.knn import few_shot_indices, knn_accuracy, knn_few_shot, topk_neighbours


def _brute_force(train, train_labels, test, test_labels, k, T, num_classes):
    """Independent reference: per query, sort all cosine similarities, sum exp(sim/T) per class, rank classes."""
    top1 = top5 = 0
    for q, y in zip(test.tolist(), test_labels.tolist()):
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, lab in zip(train.tolist(), train_labels.tolist()):
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x)) / (qn * xn), lab))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, lab in sims[:k]:
            votes[lab] += math.exp(s / T)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranked[0] == y
        top5 += y in ranked[:5] and votes[y] > 0  # zero-vote classes never count
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def _data(seed=0, n_train=70, n_test=23, dim=8, num_classes=7):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=gen)
    train_labels = torch.randint(0, num_classes, (n_train,), generator=gen)
    test_labels = torch.randint(0, num_classes, (n_test,), generator=gen)
    train = centers[train_labels] + 1.2 * torch.randn(n_train, dim, generator=gen)
    test = centers[test_labels] + 1.2 * torch.randn(n_test, dim, generator=gen)
    return train.double(), train_labels, test.double(), test_labels, num_classes


def test_topk_neighbours_chunked_equals_full_sort():
    train, _, test, _, _ = _data()
    sims, idx = topk_neighbours(test, train, k=9, train_chunk=4)  # 18 chunks: the running top-k is exercised
    full = test @ train.T
    ref_sims, ref_idx = full.sort(dim=1, descending=True)
    torch.testing.assert_close(sims, ref_sims[:, :9])
    assert torch.equal(idx, ref_idx[:, :9])


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_knn_matches_brute_force_for_every_k(T):
    train, train_labels, test, test_labels, C = _data()
    ks = [1, 3, 10, 20]
    got = knn_accuracy(train, train_labels, test, test_labels, ks, T, query_batch=5, train_chunk=6)
    for k in ks:
        ref1, ref5 = _brute_force(train, train_labels, test, test_labels, k, T, C)
        assert got[k]["top1"] == pytest.approx(ref1), k
        assert got[k]["top5"] == pytest.approx(ref5), k
    assert got[20]["top1"] > 100.0 / C  # clustered data: better than chance


def test_no_top5_with_fewer_than_five_classes():
    train, train_labels, test, test_labels, _ = _data(num_classes=3)
    got = knn_accuracy(train, train_labels, test, test_labels, [5], 0.1)
    assert set(got[5]) == {"top1"}


def test_few_shot_indices_draws_n_per_class_deterministically():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 5)
    idx = few_shot_indices(labels, 3, seed=4)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [3, 2, 3]  # a class with fewer samples keeps all of them
    assert torch.equal(idx, few_shot_indices(labels, 3, seed=4))
    draws = {tuple(few_shot_indices(labels, 1, seed=s).tolist()) for s in range(10)}
    assert len(draws) > 1
    assert torch.equal(few_shot_indices(labels, -1, seed=0), torch.arange(13))


def test_few_shot_results_average_over_tries():
    train, train_labels, test, test_labels, C = _data()
    res = knn_few_shot(train, train_labels, test, test_labels, [1, 3], 0.07, [-1, 2], n_tries=3, train_chunk=8)
    assert set(res) == {"all", "2-shot"}
    per_try = []
    for t in range(3):
        idx = few_shot_indices(train_labels, 2, seed=t)
        per_try.append(_brute_force(train[idx], train_labels[idx], test, test_labels, 3, 0.07, C)[0])
    assert res["2-shot"]["k=3"]["top1"] == pytest.approx(sum(per_try) / 3)
    assert res["all"]["k=3"]["top1_std"] == 0.0


def _knn_rank(rank, world_size, data):
    train, train_labels, test, test_labels = data
    return knn_few_shot(train, train_labels, test, test_labels, [1, 5, 20], 0.07, [-1, 3], n_tries=2, train_chunk=7)


@pytest.mark.distributed
def test_knn_two_processes_equal_one_process(tmp_path):
    train, train_labels, test, test_labels, _ = _data(n_test=25)  # odd split across ranks
    data = (train, train_labels, test, test_labels)
    single = _knn_rank(0, 1, data)
    results = run_distributed(_knn_rank, world_size=2, args=(data,), tmp_path=tmp_path)
    assert results[0] == single
    assert results[1] == single


def test_k_larger_than_the_train_set_is_reported_under_the_k_used(caplog):
    train, train_labels, test, test_labels, C = _data()
    n_two_shot = 2 * C
    with caplog.at_level("WARNING"):
        res = knn_few_shot(train, train_labels, test, test_labels, [1, 500], 0.07, [-1, 2])
    n = train.shape[0]
    assert set(res["all"]) == {"k=1", f"k={n}"}
    assert res["all"][f"k={n}"]["k_requested"] == 500
    assert set(res["2-shot"]) == {"k=1", f"k={n_two_shot}"}
    assert "k_requested" not in res["all"]["k=1"]
    full = _brute_force(train, train_labels, test, test_labels, n, 0.07, C)[0]
    assert res["all"][f"k={n}"]["top1"] == pytest.approx(full)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2
    assert f"k=500 is larger than the {n} train samples" in warned[0]
