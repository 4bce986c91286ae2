"""Weighted k-NN against an explicit brute-force loop, few-shot draws, and 2-process == 1-process."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_distributed

from ssl_distill.eval import knn_search
from ssl_distill.eval.knn import few_shot_indices, knn_accuracy, knn_correct_counts, knn_few_shot
from ssl_distill.eval.knn_search import _inverse_row_norms, topk_neighbours


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


# --------------------------------------------------------------------------- ties, near-ties, device independence


def _reference_counts(train, train_labels, test, test_labels, ks, T, num_classes):
    """Plain-Python float64 k-NN: correctly rounded (``math.fsum``) cosine similarities snapped to the 2^-32 grid,
    neighbours ordered by (similarity desc, index asc), classes by (votes desc, class asc); returns
    ``{k: [top1_correct, top5_correct]}``."""
    xs, qs = train.double().tolist(), test.double().tolist()
    norms = [math.sqrt(math.fsum(v * v for v in x)) for x in xs]
    out = {k: [0, 0] for k in ks}
    for q, y in zip(qs, test_labels.tolist()):
        qn = math.sqrt(math.fsum(v * v for v in q))
        sims = [round(math.fsum(a * b for a, b in zip(q, x)) / (qn * n) * 2**32) / 2**32
                for x, n in zip(xs, norms)]
        order = sorted(range(len(xs)), key=lambda i: (-sims[i], i))
        for k in ks:
            votes = [0.0] * num_classes
            for i in order[:k]:
                votes[int(train_labels[i])] += math.exp(sims[i] / T)
            ranked = sorted(range(num_classes), key=lambda c: (-votes[c], c))
            out[k][0] += ranked[0] == y
            out[k][1] += (y in ranked[:5] and votes[y] > 0) if num_classes >= 5 else 0
    return out


def _tie_bank(seed=0):
    """float32 features full of exact ties and near-ties, the cases float32 similarities cannot rank.

    * exact duplicates of train rows carrying *other* labels (exact similarity ties: the lowest index must win);
    * copies with one component moved by 1 ulp (similarities ~1e-8 apart, below float32 resolution of ~6e-8);
    * a collinear block, ``mean + 1e-5 * noise``, like a random ViT's CLS features (cosines 1 - 1e-10 apart);
    queries are some train rows themselves, collinear ones and random ones. 7 classes.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(10, 16, generator=g)
    labels = torch.randint(0, 7, (10,), generator=g)
    dup = base[:6].clone()
    dup_labels = (labels[:6] + 1 + torch.arange(6) % 3) % 7  # another class than the original
    ulp = base[:6].clone()
    ulp[:, 0] = torch.nextafter(ulp[:, 0], torch.full((6,), float("inf")))
    ulp_labels = (labels[:6] + 4) % 7
    mean = torch.randn(16, generator=g)
    collinear = mean + 1e-5 * torch.randn(14, 16, generator=g)
    col_labels = torch.randint(0, 7, (14,), generator=g)
    train = torch.cat([dup, base, ulp, collinear])  # duplicates *before* their originals: index order matters
    train_labels = torch.cat([dup_labels, labels, ulp_labels, col_labels])
    test = torch.cat([base[:6], mean + 1e-5 * torch.randn(6, 16, generator=g), torch.randn(4, 16, generator=g)])
    test_labels = torch.randint(0, 7, (16,), generator=g)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("perm_seed", [0, 1, 2])
def test_ties_and_near_ties_equal_a_float64_reference(dtype, perm_seed):
    """Any bank order, chunk size, query batch and dtype: the result equals the plain-Python float64 reference on the
    same values (in the same order). The float32 k-NN this replaced got k=1 wrong here (ties decided by ``topk``)."""
    train, train_labels, test, test_labels = _tie_bank()
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    train, train_labels = train[perm].to(dtype), train_labels[perm]
    test = test.to(dtype)
    ks = [1, 2, 3, 5, 9]
    want = _reference_counts(train, train_labels, test, test_labels, ks, 0.07, 7)
    for chunk, query_batch in ((1, 16), (5, 3), (7, 1), (1000, 256)):
        got = knn_correct_counts(train, train_labels, test, test_labels, ks, 0.07, 7, query_batch, chunk)
        assert {k: v.tolist() for k, v in got.items()} == want, (chunk, query_batch)


def test_exact_ties_go_to_the_lowest_train_index():
    """A query equal to a train row that is stored twice with different labels: the first copy is the neighbour."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    train = torch.cat([x, x[2:3], x[2:3]])  # rows 2, 5 and 6 are identical
    for chunk in (1, 2, 3, 7):
        sims, idx = topk_neighbours(x[2:3], train, k=3, train_chunk=chunk, train_scale=_inverse_row_norms(train))
        assert idx.tolist() == [[2, 5, 6]], chunk
        assert sims[0, 0] == sims[0, 1] == sims[0, 2]
    labels = torch.tensor([0, 1, 2, 3, 4, 1, 3])
    for first in (2, 1, 3):  # whichever class the lowest-index copy carries wins k=1
        labels[2] = first
        got = knn_correct_counts(train, labels, x[2:3], torch.tensor([first]), [1], 0.07, 5, train_chunk=2)
        assert got[1][0] == 1


def test_similarities_are_float64_whatever_the_matmul_precision_flags():
    """The search computes in float64 (so TF32 / reduced-precision float32 matmuls cannot touch it) and its result
    does not move when the global precision flags ask for the fastest float32 matmuls."""
    train, train_labels, test, test_labels = _tie_bank(seed=1)
    q = torch.nn.functional.normalize(test.double(), dim=1)
    sims, idx = topk_neighbours(q, train, k=5, train_chunk=4, train_scale=_inverse_row_norms(train))
    assert sims.dtype == torch.float64
    ref = q @ torch.nn.functional.normalize(train.double(), dim=1).T
    torch.testing.assert_close(sims, ref.gather(1, idx), rtol=0, atol=2.0**-32)  # float32 would be ~1e-7 off
    before = knn_correct_counts(train, train_labels, test, test_labels, [1, 5], 0.07, 7, train_chunk=3)
    old = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.allow_tf32 = True
        after = knn_correct_counts(train, train_labels, test, test_labels, [1, 5], 0.07, 7, train_chunk=3)
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cuda.matmul.allow_tf32 = old[1]
    assert {k: v.tolist() for k, v in after.items()} == {k: v.tolist() for k, v in before.items()}


def test_equal_votes_go_to_the_lowest_class():
    """k=2 with two exactly tied neighbours of classes 4 and 1: class 1 ranks first."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    train = torch.cat([x[:1], x[:1], x[1:]])
    labels = torch.tensor([4, 1, 0, 2])
    for target, top1 in ((1, 1), (4, 0)):
        got = knn_correct_counts(train, labels, x[:1], torch.tensor([target]), [2], 0.07, 5)
        assert got[2].tolist() == [top1, 1]


def test_non_finite_features_are_one_clear_error():
    train, train_labels, test, test_labels, _ = _data()
    train[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train features contain NaN or inf"):
        knn_accuracy(train, train_labels, test, test_labels, [1])


# --------------------------------------------------------------------------- the float32 scan and its exact fallback


def _mixed_bank(seed=0):
    """300 train rows in 16-D, large enough that ``k + CANDIDATE_MARGIN`` candidates are a real subset: 100 clustered
    random rows (their top-k is well separated, the float32 scan proves it) and 200 rows collinear to ~1e-9 like a
    random ViT's CLS features (every similarity within float32 error of the others: the proof fails, the exact search
    answers), 7 classes. Queries: 8 random ones, then 8 collinear ones, then 4 copies of train rows."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(7, 16, generator=g)
    rand_labels = torch.randint(0, 7, (100,), generator=g)
    rand = centers[rand_labels] + 0.5 * torch.randn(100, 16, generator=g)
    mean = torch.randn(16, generator=g)
    collinear = mean + 1e-5 * torch.randn(200, 16, generator=g)  # float32: the noise is ~1e-5 of the norm
    col_labels = torch.randint(0, 7, (200,), generator=g)
    train = torch.cat([rand[:50], collinear, rand[50:]])
    train_labels = torch.cat([rand_labels[:50], col_labels, rand_labels[50:]])
    q_labels = torch.randint(0, 7, (8,), generator=g)
    test = torch.cat([centers[q_labels] + 0.5 * torch.randn(8, 16, generator=g),
                      mean + 1e-5 * torch.randn(8, 16, generator=g), train[[3, 60, 120, 280]]])
    test_labels = torch.cat([q_labels, torch.randint(0, 7, (12,), generator=g)])
    return train, train_labels, test, test_labels


@pytest.fixture
def exact_rows(monkeypatch):
    """Counts the queries the exact float64 search answers (the fallback), one entry per call."""
    calls = []
    original = knn_search._topk_exact

    def spy(q, *args):
        calls.append(q.shape[0])
        return original(q, *args)

    monkeypatch.setattr(knn_search, "_topk_exact", spy)
    return calls


def test_well_separated_bank_is_answered_by_the_float32_scan_alone(exact_rows):
    """Clustered random features: every query's candidates provably hold its exact top-k, so no query reaches the
    exact search, and the neighbours, similarities and counts equal the exact search's and the reference's."""
    train, train_labels, test, test_labels = _mixed_bank()
    keep = torch.cat([torch.arange(50), torch.arange(250, 300)])  # the 100 random rows only
    train, train_labels, test = train[keep], train_labels[keep], test[:8]
    ks = [1, 3, 10, 20]
    assert max(ks) + knn_search.CANDIDATE_MARGIN < train.shape[0]  # candidates are a real subset: the proof matters
    want = _reference_counts(train, train_labels, test, test_labels[:8], ks, 0.07, 7)
    for chunk, query_batch in ((7, 3), (1000, 256)):
        got = knn_correct_counts(train, train_labels, test, test_labels[:8], ks, 0.07, 7, query_batch, chunk)
        assert {k: v.tolist() for k, v in got.items()} == want
    assert exact_rows == []
    q = torch.nn.functional.normalize(test.double(), dim=1)
    scale = _inverse_row_norms(train)
    sims, idx = topk_neighbours(q, train, 20, train_chunk=9, train_scale=scale)
    assert exact_rows == []
    ref_sims, ref_idx = knn_search._topk_exact(q, train, 20, 9, scale)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(sims, ref_sims)


def test_collinear_queries_fall_back_to_the_exact_search(exact_rows):
    """The collinear block defeats the float32 proof for the collinear queries (and only the rows that fail go to the
    exact search); the random queries stay on the fast path; the counts equal the reference either way."""
    train, train_labels, test, test_labels = _mixed_bank()
    ks = [1, 5, 10]
    got = knn_correct_counts(train, train_labels, test, test_labels, ks, 0.07, 7, train_chunk=64)
    assert {k: v.tolist() for k, v in got.items()} == _reference_counts(train, train_labels, test, test_labels, ks,
                                                                         0.07, 7)
    assert len(exact_rows) == 1
    assert 8 <= exact_rows[0] < test.shape[0]  # the 8 collinear queries at least, never all of them


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("perm_seed", [0, 1])
def test_fast_and_exact_paths_equal_the_reference_for_any_order_chunk_and_dtype(dtype, perm_seed, monkeypatch):
    """The mixed bank in any order and dtype, with no margin (every query takes the exact search), one candidate of
    margin (most do) and the default (few do), for several chunk sizes and query batches: always the reference."""
    train, train_labels, test, test_labels = _mixed_bank(seed=2)
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    train, train_labels, test = train[perm].to(dtype), train_labels[perm], test.to(dtype)
    ks = [1, 2, 5, 9]
    want = _reference_counts(train, train_labels, test, test_labels, ks, 0.07, 7)
    for margin in (0, 1, knn_search.CANDIDATE_MARGIN):
        monkeypatch.setattr(knn_search, "CANDIDATE_MARGIN", margin)
        for chunk, query_batch in ((1, 20), (37, 3), (1000, 256)):
            got = knn_correct_counts(train, train_labels, test, test_labels, ks, 0.07, 7, query_batch, chunk)
            assert {k: v.tolist() for k, v in got.items()} == want, (margin, chunk, query_batch)


def test_features_beyond_the_float32_bound_take_the_exact_search(exact_rows):
    """float64 features of norm ~2^40 would overflow the float32 scan's products: the whole bank goes exact."""
    train, train_labels, test, test_labels = _mixed_bank()
    train, test = train.double() * 2.0**40, test.double()
    ks = [1, 5]
    got = knn_correct_counts(train, train_labels, test, test_labels, ks, 0.07, 7)
    assert {k: v.tolist() for k, v in got.items()} == _reference_counts(train, train_labels, test, test_labels, ks,
                                                                         0.07, 7)
    assert exact_rows == [test.shape[0]]


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "matmul"), reason="torch < 2.9: no per-backend fp32 precision")
def test_float32_scan_runs_in_ieee_precision_and_restores_the_flags(monkeypatch):
    """With TF32 (CUDA) and bf16 (oneDNN) allowed for float32 matmuls, the scan still runs in IEEE float32, which its
    error bound assumes, and the caller's flags are back afterwards."""
    seen = []
    original = knn_search._scan_float32

    def spy(*args):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return original(*args)

    monkeypatch.setattr(knn_search, "_scan_float32", spy)
    train, train_labels, test, test_labels = _mixed_bank()
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    old = [b.fp32_precision for b in backends]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        got = knn_correct_counts(train, train_labels, test, test_labels, [1, 5], 0.07, 7)
        assert [b.fp32_precision for b in backends] == ["tf32", "bf16"]
    finally:
        for b, o in zip(backends, old):
            b.fp32_precision = o
    assert seen == [("ieee", "ieee")]
    want = _reference_counts(train, train_labels, test, test_labels, [1, 5], 0.07, 7)
    assert {k: v.tolist() for k, v in got.items()} == want
