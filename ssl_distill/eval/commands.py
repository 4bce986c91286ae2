"""``ssl-distill eval-knn`` and ``ssl-distill eval-linear``: arguments and the runs behind them.

``add_*_args`` need only argparse (the CLI builds its parser without importing torch); ``run_*`` import lazily.
User mistakes raise :class:`~ssl_distill.eval.data.EvalInputError` (a ``ValueError``), which the CLI prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KNN_RESULTS = "results_eval_knn.json"
LINEAR_RESULTS = "results_eval_linear.json"
BEST_HEAD = "best_linear_head.pth"


def _add_common_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--pretrained-weights", required=True,
                   help="a training checkpoint (its teacher backbone is used), an exported backbone / official DINOv2 "
                        "state dict (architecture from --config-file and key=value overrides), a model-zoo name, "
                        "or 'random' for a randomly initialised baseline")
    p.add_argument("--train-dataset", required=True, help="class-folder tree <root>/<class>/<image> to fit on")
    p.add_argument("--val-dataset", required=True, help="class-folder tree with the same class names, to score on")
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


def _check_args(args: argparse.Namespace) -> None:
    from ssl_distill.eval.data import EvalInputError

    checks = [(args.batch_size >= 1, "--batch-size must be >= 1"), (args.image_size >= 1, "--image-size must be >= 1"),
              (args.num_workers >= 0, "--num-workers must be >= 0")]
    if hasattr(args, "nb_knn"):
        checks += [(min(args.nb_knn) >= 1, "--nb-knn values must be >= 1"),
                   (args.temperature > 0, "--temperature must be > 0"), (args.n_tries >= 1, "--n-tries must be >= 1"),
                   (all(n == -1 or n >= 1 for n in args.n_per_class_list), "--n-per-class-list: use -1 or >= 1"),
                   (args.train_chunk >= 1, "--train-chunk must be >= 1")]
    else:
        checks += [(args.epochs >= 1, "--epochs must be >= 1"),
                   (min(args.learning_rates or [1]) > 0, "--learning-rates must be > 0")]
    for ok, message in checks:
        if not ok:
            raise EvalInputError(message)


def _setup(args: argparse.Namespace) -> tuple[Any, dict, Any, Any]:
    """Distributed init, device, backbone (on device) and its info, autocast dtype."""
    import torch

    from ssl_distill.distributed import init_distributed, resolve_device
    from ssl_distill.eval.data import EvalInputError
    from ssl_distill.hub import HubError, resolve_backbone

    _check_args(args)
    init_distributed()
    try:
        device = resolve_device(args.device, what="--device")
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    torch.manual_seed(args.seed)
    try:
        model, info = resolve_backbone(args.pretrained_weights, args.config_file, args.opts, seed=args.seed)
    except HubError as err:
        raise EvalInputError(str(err)) from None
    if args.image_size % model.patch_size:
        p = model.patch_size
        lower, upper = args.image_size // p * p, (args.image_size // p + 1) * p
        raise EvalInputError(f"--image-size {args.image_size} is not a multiple of the model's patch size {p}; use "
                             f"{lower or upper} or {upper}.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.autocast]
    return model.to(device), info, device, dtype


def _features(model: Any, info: dict, dataset: Any, args: argparse.Namespace, device: Any, dtype: Any,
              desc: str) -> dict:
    from ssl_distill.eval.features import cached_features, extract_features, feature_cache_key

    n_last = min(4, len(model.blocks))
    key = feature_cache_key(info["weights_hash"], dataset, dataset.transform, n_last)
    return cached_features(args.cache_dir, key, lambda: extract_features(
        model, dataset, args.batch_size, args.num_workers, n_last, device, dtype, desc))


def _write_json(path: Path, payload: dict) -> None:
    from ssl_distill.distributed import is_main_process
    from ssl_distill.fileio import atomic_write_text

    if is_main_process():
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        logger.info("wrote %s", path)


def _common_payload(args: argparse.Namespace, info: dict, train: Any, val: Any) -> dict:
    return {"pretrained_weights": args.pretrained_weights, "weights": info, "train_dataset": args.train_dataset,
            "val_dataset": args.val_dataset, "n_train": len(train), "n_val": len(val),
            "classes": list(train.classes), "image_size": args.image_size}


def run_knn_command(args: argparse.Namespace) -> int:
    """Extract (or load cached) features, run weighted k-NN for every k and few-shot n, write the JSON."""
    from ssl_distill.eval.data import load_labelled_datasets
    from ssl_distill.eval.knn import knn_few_shot
    from ssl_distill.eval.transforms import make_eval_transform

    model, info, device, dtype = _setup(args)
    transform = make_eval_transform(args.image_size)
    train, val = load_labelled_datasets(args.train_dataset, args.val_dataset, transform, transform,
                                        args.bad_image_policy)
    train_f = _features(model, info, train, args, device, dtype, "train features")
    val_f = _features(model, info, val, args, device, dtype, "val features")
    results = knn_few_shot(train_f["cls"][:, -1], train_f["labels"], val_f["cls"][:, -1], val_f["labels"],
                           args.nb_knn, args.temperature, args.n_per_class_list, args.n_tries, args.train_chunk)
    payload = {"task": "knn", **_common_payload(args, info, train, val), "temperature": args.temperature,
               "nb_knn": list(args.nb_knn), "n_tries": args.n_tries, "results": results}
    _write_json(Path(args.output_dir) / KNN_RESULTS, payload)
    for shots, per_k in results.items():
        logger.info("k-NN %s: %s", shots, ", ".join(f"{k} top1 {v['top1']:.2f}" for k, v in per_k.items()))
    return 0


def _image_batches(model: Any, train: Any, args: argparse.Namespace, device: Any, dtype: Any, n_last: int):
    """``(batches(epoch), iters_per_epoch)``: augmented images through the frozen backbone, sharded over ranks."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ssl_distill.distributed import get_rank, get_world_size
    from ssl_distill.eval.features import autocast_context, forward_eval_features

    sampler = DistributedSampler(train, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            with torch.no_grad(), autocast_context(device, dtype):
                feats = forward_eval_features(model, images.to(device, non_blocking=True), n_last)
            yield {**feats, "labels": labels.to(device)}

    return batches, len(loader)


def _save_best_head(path: Path, heads: Any, best: dict, classes: list[str], info: dict) -> None:
    import torch

    from ssl_distill.distributed import is_main_process
    from ssl_distill.fileio import atomic_open

    if not is_main_process():
        return
    head = heads.heads[best["index"]]
    payload = {"state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
               "n_blocks": best["n_blocks"], "avgpool": best["avgpool"], "lr": best["lr"], "top1": best["top1"],
               "classes": classes, "weights_hash": info["weights_hash"]}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    logger.info("saved the best head (%s, val top1 %.2f) to %s", best["name"], best["top1"], path)


def run_linear_command(args: argparse.Namespace) -> int:
    """Train the grid of linear heads on the frozen backbone, pick the best on val, write JSON and the best head."""
    from ssl_distill.distributed import get_world_size
    from ssl_distill.eval.data import load_labelled_datasets
    from ssl_distill.eval.linear import (
        DEFAULT_LEARNING_RATES,
        LinearHeads,
        evaluate_heads,
        head_grid,
        summarize,
        tensor_batches,
        train_heads,
    )
    from ssl_distill.eval.transforms import make_eval_transform, make_train_transform

    model, info, device, dtype = _setup(args)
    eval_tf = make_eval_transform(args.image_size)
    train_tf = eval_tf if args.precomputed_features else make_train_transform(args.image_size)
    train, val = load_labelled_datasets(args.train_dataset, args.val_dataset, train_tf, eval_tf, args.bad_image_policy)
    n_last = min(4, len(model.blocks))
    specs = head_grid(args.learning_rates or DEFAULT_LEARNING_RATES, sorted({1, n_last}))
    heads = LinearHeads(specs, model.embed_dim, len(train.classes)).to(device)
    if args.precomputed_features:
        train_f = {k: v.to(device) for k, v in _features(model, info, train, args, device, dtype, "train").items()}
        batches = tensor_batches(train_f, args.batch_size, args.seed)
        iters = math.ceil(math.ceil(len(train) / get_world_size()) / args.batch_size)
    else:
        batches, iters = _image_batches(model, train, args, device, dtype, n_last)
    lr_scale = args.batch_size * get_world_size() / 256.0
    losses = train_heads(heads, batches, args.epochs, iters, lr_scale)
    val_f = {k: v.to(device) for k, v in _features(model, info, val, args, device, dtype, "val").items()}
    summary = summarize(specs, evaluate_heads(heads, val_f))
    payload = {"task": "linear", **_common_payload(args, info, train, val), "epochs": args.epochs,
               "batch_size": args.batch_size, "lr_scale": lr_scale, "precomputed_features": args.precomputed_features,
               "final_train_loss": losses[-1] if losses else None, **summary}
    out = Path(args.output_dir)
    _write_json(out / LINEAR_RESULTS, payload)
    _save_best_head(out / BEST_HEAD, heads, summary["best"], list(train.classes), info)
    logger.info("linear probe: best head %s, val top1 %.2f", summary["best"]["name"], summary["best"]["top1"])
    return 0
