"""The runs behind ``ssl-distill eval-knn`` and ``ssl-distill eval-linear`` (their arguments: :mod:`.args`).

User mistakes raise :class:`~ssl_distill.eval.data.EvalInputError` (a ``ValueError``), which the command prints as
one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ssl_distill.distributed import get_rank, get_world_size, init_distributed, is_main_process, resolve_device
from ssl_distill.eval.args import BEST_HEAD, KNN_RESULTS, LINEAR_RESULTS
from ssl_distill.eval.data import EvalInputError, load_labelled_datasets, untested_classes
from ssl_distill.eval.features import (
    autocast_context,
    cached_features,
    extract_features,
    feature_cache_key,
    forward_eval_features,
)
from ssl_distill.eval.knn import knn_few_shot
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
from ssl_distill.fileio import atomic_open, atomic_write_text
from ssl_distill.hub import HubError, resolve_backbone

logger = logging.getLogger(__name__)


def _check_args(args: argparse.Namespace) -> None:
    """Values argparse cannot check (ranges), as one :class:`EvalInputError`."""
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
    """Features of ``dataset`` (``cls`` ``(n, n_last, D)``, ``labels`` ...), from the cache when it has them."""
    n_last = min(4, model.n_blocks)
    key = feature_cache_key(info["weights_hash"], dataset, dataset.transform, n_last)
    return cached_features(args.cache_dir, key, lambda: extract_features(
        model, dataset, args.batch_size, args.num_workers, n_last, device, dtype, desc))


def _write_json(path: Path, payload: dict) -> None:
    if is_main_process():
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        logger.info("wrote %s", path)


def _common_payload(args: argparse.Namespace, info: dict, train: Any, val: Any) -> dict:
    return {"pretrained_weights": args.pretrained_weights, "weights": info, "train_dataset": args.train_dataset,
            "val_dataset": args.val_dataset, "n_train": len(train), "n_val": len(val),
            "classes": list(train.classes), "untested_classes": untested_classes(list(train.classes), val),
            "image_size": args.image_size}


def run_knn(args: argparse.Namespace) -> int:
    """Extract (or load cached) features, run weighted k-NN for every k and few-shot n, write the JSON."""

    model, info, device, dtype = _setup(args)
    transform = make_eval_transform(args.image_size)
    train, val = load_labelled_datasets(args.train_dataset, args.val_dataset, transform, transform,
                                        args.bad_image_policy)
    train_f = _features(model, info, train, args, device, dtype, "train features")
    val_f = _features(model, info, val, args, device, dtype, "val features")
    results = knn_few_shot(train_f["cls"][:, -1], train_f["labels"], val_f["cls"][:, -1], val_f["labels"],
                           args.nb_knn, args.temperature, args.n_per_class_list, args.n_tries, args.train_chunk,
                           device)
    payload = {"task": "knn", **_common_payload(args, info, train, val), "temperature": args.temperature,
               "nb_knn": list(args.nb_knn), "n_tries": args.n_tries, "results": results}
    _write_json(Path(args.output_dir) / KNN_RESULTS, payload)
    for shots, per_k in results.items():
        logger.info("k-NN %s: %s", shots, ", ".join(f"{k} top1 {v['top1']:.2f}" for k, v in per_k.items()))
    return 0


def _image_batches(model: torch.nn.Module, train: Any, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype | None, n_last: int) -> tuple[Callable[[int], Iterator[dict]], int]:
    """``(batches(epoch), iters_per_epoch)``: augmented images through the frozen backbone, sharded over ranks."""
    sampler = DistributedSampler(train, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")

    def batches(epoch: int) -> Iterator[dict]:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            with torch.no_grad(), autocast_context(device, dtype):
                feats = forward_eval_features(model, images.to(device, non_blocking=True), n_last)
            yield {**feats, "labels": labels.to(device)}

    return batches, len(loader)


def _save_best_head(path: Path, heads: Any, best: dict, classes: list[str], info: dict) -> None:
    """Rank 0 saves the best head with what using it needs (block count, pooling, classes, weights hash)."""
    if not is_main_process():
        return
    head = heads.heads[best["index"]]
    payload = {"state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
               "n_blocks": best["n_blocks"], "avgpool": best["avgpool"], "lr": best["lr"], "top1": best["top1"],
               "classes": classes, "weights_hash": info["weights_hash"]}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    logger.info("saved the best head (%s, val top1 %.2f) to %s", best["name"], best["top1"], path)


def run_linear(args: argparse.Namespace) -> int:
    """Train the grid of linear heads on the frozen backbone, pick the best on val, write JSON and the best head."""
    model, info, device, dtype = _setup(args)
    eval_tf = make_eval_transform(args.image_size)
    train_tf = eval_tf if args.precomputed_features else make_train_transform(args.image_size)
    train, val = load_labelled_datasets(args.train_dataset, args.val_dataset, train_tf, eval_tf, args.bad_image_policy)
    n_last = min(4, model.n_blocks)
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
