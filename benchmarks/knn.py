"""Weighted k-NN throughput and peak memory: ``ssl_distill.eval.knn`` vs DINO's reference ``knn_classifier``.

Random L2-normalisable features (``N`` train x ``D``, ``Q`` queries, ``C`` classes), k in (10, 20, 100, 200).
The reference (dino ``eval_knn.py``) normalises a copy of the train matrix, transposes it and scores 100 queries
at a time against all ``N`` train features (a ``100 x N`` similarity matrix), then takes the top-k. Peak memory is
reported as extra bytes over the process before the call and as a multiple of the feature matrix size
(target: our peak < 2x the feature matrix, input included). Runs alternate; median of ``--repeats``::

    .venv/bin/python benchmarks/knn.py --train 100000 1000000

Writes ``benchmarks/results/knn.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import PeakMemory, median, print_table, time_alternating, write_json  # noqa: E402

from ssl_distill.eval.knn import knn_correct_counts  # noqa: E402

KS = (10, 20, 100, 200)


def reference_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                  k: int, T: float, num_classes: int, imgs_per_chunk: int = 100) -> int:
    """DINO's ``knn_classifier`` (top-1 correct count for one ``k``), written as in facebookresearch/dino."""
    train = torch.nn.functional.normalize(train, dim=1).t()
    test = torch.nn.functional.normalize(test, dim=1)
    correct = 0
    retrieval_one_hot = torch.zeros(k, num_classes)
    for idx in range(0, test.shape[0], imgs_per_chunk):
        features = test[idx : idx + imgs_per_chunk]
        targets = test_labels[idx : idx + imgs_per_chunk]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(retrieval_one_hot.view(batch_size, -1, num_classes) * distances_transform.view(
            batch_size, -1, 1), 1)
        _, predictions = probs.sort(1, True)
        correct += int(predictions.narrow(1, 0, 1).eq(targets.view(-1, 1)).sum())
    return correct


def bench_size(n_train: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, args.dim, generator=g)
    train_labels = torch.randint(0, args.classes, (n_train,), generator=g)
    test = torch.randn(args.queries, args.dim, generator=g)
    test_labels = torch.randint(0, args.classes, (args.queries,), generator=g)
    matrix_bytes = train.numel() * train.element_size()
    fns = {
        "dino reference (all k)": lambda: [reference_knn(train, train_labels, test, test_labels, k, 0.07,
                                                         args.classes) for k in KS],
        "ours (all k at once)": lambda: knn_correct_counts(train, train_labels, test, test_labels, KS, 0.07,
                                                           args.classes),
    }
    ours_counts = fns["ours (all k at once)"]()
    ref_counts = fns["dino reference (all k)"]()
    agree = all(int(ours_counts[k][0]) == ref for k, ref in zip(KS, ref_counts))
    times = time_alternating(fns, args.repeats, torch.device("cpu"), warmup=0)
    rows = []
    base = median(times["dino reference (all k)"])
    for name, fn in fns.items():
        gc.collect()
        with PeakMemory(torch.device("cpu")) as pm:
            fn()
        t = median(times[name])
        rows.append({"n_train": n_train, "impl": name, "s": t, "queries_per_s": args.queries / t,
                     "speedup": base / t, "extra_peak_gib": pm.peak / 2**30,
                     "peak_over_matrix": (pm.peak + matrix_bytes) / matrix_bytes, "top1_agree": agree,
                     "times_s": times[name]})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, nargs="+", default=[100_000, 1_000_000], help="train-set sizes")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    rows = []
    for n in args.train:
        rows += bench_size(n, args)
    print_table(rows, ["n_train", "impl", "s", "queries_per_s", "speedup", "extra_peak_gib", "peak_over_matrix",
                       "top1_agree"])
    write_json("knn", {"args": vars(args), "rows": rows}, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
