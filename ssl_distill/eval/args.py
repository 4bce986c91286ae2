"""Arguments of ``ssl-distill eval-knn`` / ``eval-linear`` (argparse only: the CLI builds its parser without torch).

The runs behind them are in :mod:`ssl_distill.eval.run`.
"""

from __future__ import annotations

import argparse

# The files an evaluation writes into --output-dir (a finished run is recognised by them).
KNN_RESULTS = "results_eval_knn.json"
LINEAR_RESULTS = "results_eval_linear.json"
BEST_HEAD = "best_linear_head.pth"


def _add_common_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--pretrained-weights", required=True,
                   help="a training checkpoint (its teacher backbone is used), an exported backbone / official DINOv2 "
                        "state dict (architecture from --config-file and key=value overrides), a model-zoo name, "
                        "or 'random' for a randomly initialised baseline")
    p.add_argument("--train-dataset", required=True,
                   help="class-folder tree <root>/<class>/<image> to fit on, or its shards (`ssl-distill shards` OUT "
                   "folder, index.json, brace pattern or http(s) URL)")
    p.add_argument("--val-dataset", required=True,
                   help="class-folder tree (or its shards) with the same class names, to score on")
    p.add_argument("--output-dir", required=True, help="where the results JSON (and best head) are written")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per forward pass and rank")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per rank")
    p.add_argument("--image-size", type=int, default=224,
                   help="evaluation crop S: resize the shorter side to S*256/224 (bicubic), centre-crop S")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--autocast", choices=("bf16", "fp16", "none"), default="bf16",
                   help="mixed precision for the backbone forward (CUDA only)")
    p.add_argument("--cache-dir", default=None,
                   help="cache extracted features here, keyed by weights hash + dataset + transform")
    p.add_argument("--bad-image-policy", choices=("error", "skip"), default="error",
                   help="what to do with unreadable images: stop (error) or substitute the next one (skip)")
    p.add_argument("--seed", type=int, default=0, help="seed for random init, few-shot draws and shuffling")


def add_knn_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``eval-knn``."""
    _add_common_args(p, batch_size=256)
    p.add_argument("--nb-knn", type=int, nargs="+", default=[10, 20, 100, 200], help="numbers of neighbours k")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    p.add_argument("--n-per-class-list", type=int, nargs="+", default=[-1],
                   help="train images per class for few-shot k-NN; -1 = all of them")
    p.add_argument("--n-tries", type=int, default=1, help="random few-shot draws to average per n")
    p.add_argument("--train-chunk", type=int, default=65536,
                   help="train features compared per step; bounds memory to batch x chunk similarities")


def add_linear_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``eval-linear``."""
    _add_common_args(p, batch_size=128)
    p.add_argument("--epochs", type=int, default=10, help="passes over the train set")
    p.add_argument("--learning-rates", type=float, nargs="+", default=None,
                   help="learning-rate grid, each scaled by batch_size * world_size / 256 (default: 13 values "
                        "1e-5, 2e-5, 5e-5 ... 0.1)")
    p.add_argument("--precomputed-features", action="store_true",
                   help="fast mode: extract train features once (no augmentation) and train the heads on them")
