"""Batched feature extraction from a frozen backbone: sharded across ranks, gathered in dataset order, cached.

One forward per image gives everything the probes need (as in DINOv2's linear evaluation, Oquab et al. 2023):

* ``cls``: the normalised CLS tokens of the last ``L`` blocks, ``(N, L, D)``; ``cls[:, -1]`` is ``x_norm_clstoken``
  (what k-NN uses);
* ``patch_mean``: the average of the last block's normalised patch tokens, ``(N, D)``;
* ``labels``: ``(N,)`` int64.

Rank ``r`` of ``W`` extracts the contiguous slice ``[r * ceil(N/W), (r+1) * ceil(N/W))``, so gathering the slices
in rank order restores dataset order and every rank ends with identical tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_distill.distributed import all_gather_cat, barrier, get_rank, get_world_size, is_main_process
from ssl_distill.fileio import atomic_open

logger = logging.getLogger(__name__)

Features = dict[str, Tensor]
CACHE_VERSION = 1


def forward_eval_features(model: nn.Module, images: Tensor, n_last_blocks: int = 4) -> Features:
    """``images (B, 3, H, W)`` -> ``{"cls": (B, L, D), "patch_mean": (B, D)}`` (float32), ``L = n_last_blocks``."""
    outputs = model.get_intermediate_layers(images, n_last_blocks, return_class_token=True, norm=True)
    cls = torch.stack([c for _, c in outputs], dim=1)
    patch_mean = outputs[-1][0].mean(dim=1)
    return {"cls": cls.float(), "patch_mean": patch_mean.float()}


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``range(n)`` that ``rank`` extracts."""
    per_rank = math.ceil(n / world_size)
    return range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on CUDA; a no-op on other devices or with ``dtype=None``."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _progress(loader: DataLoader, desc: str) -> Any:
    if not (is_main_process() and sys.stderr.isatty()):
        return loader
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return loader
    return tqdm(loader, desc=desc, leave=False)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    n_last_blocks: int = 4,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "features",
) -> Features:
    """Features of every sample of ``dataset`` (which yields ``(image (3, H, W), label)``), in dataset order.

    Returns ``{"cls": (N, L, D), "patch_mean": (N, D), "labels": (N,)}`` on the CPU, identical on every rank.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) applies only on CUDA.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shard = Subset(dataset, list(shard_range(len(dataset), get_rank(), get_world_size())))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    parts: dict[str, list[Tensor]] = {"cls": [], "patch_mean": [], "labels": []}
    was_training = model.training
    model.eval()
    for images, labels in _progress(loader, desc):
        with autocast_context(device, autocast_dtype):
            feats = forward_eval_features(model, images.to(device, non_blocking=True), n_last_blocks)
        for key, value in feats.items():
            parts[key].append(value.to(device))
        parts["labels"].append(torch.as_tensor(labels, dtype=torch.long).to(device))
    model.train(was_training)
    local = {k: torch.cat(v) if v else _empty(k, model, n_last_blocks, device) for k, v in parts.items()}
    return {k: all_gather_cat(v).cpu() for k, v in local.items()}


def _empty(key: str, model: nn.Module, n_last_blocks: int, device: torch.device) -> Tensor:
    """A zero-length tensor of the right trailing shape, for a rank whose shard is empty."""
    dim = model.embed_dim
    shapes = {"cls": (0, n_last_blocks, dim), "patch_mean": (0, dim), "labels": (0,)}
    return torch.zeros(shapes[key], dtype=torch.long if key == "labels" else torch.float32, device=device)


# --------------------------------------------------------------------------------------------- cache


def _raw(text: str) -> bytes:
    """``text`` as bytes, also when it holds a file name that is not valid UTF-8: Python decodes such names with
    lone surrogates (``surrogateescape``), which a plain ``.encode()`` refuses; ``surrogatepass`` keeps them, and
    distinct names stay distinct."""
    return text.encode("utf-8", "surrogatepass")


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over the dataset's root, classes and each sample's path, label, size and modification time.

    Paths are hashed as they are, whatever their encoding (a name with non-UTF-8 bytes must not stop an evaluation
    that training on the same tree runs through)."""
    h = hashlib.sha256(_raw(f"{getattr(dataset, 'root', '')}|{getattr(dataset, 'classes', [])}|"))
    if hasattr(dataset, "fingerprint"):  # shards: their recorded sha256 (or size + mtime), not a stat per sample
        h.update(_raw(dataset.fingerprint()))
        return h.hexdigest()
    for path, label in getattr(dataset, "samples", []):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(_raw(f"{path}|{label}|{stamp}\n"))
    return h.hexdigest()


def feature_cache_key(weights_hash: str, dataset: Any, transform: Any, n_last_blocks: int) -> str:
    """Cache key: weights hash + dataset fingerprint + the transform's repr + the feature layout."""
    text = f"v{CACHE_VERSION}|{weights_hash}|{dataset_fingerprint(dataset)}|{transform!r}|{n_last_blocks}"
    return hashlib.sha256(_raw(text)).hexdigest()[:32]


def cached_features(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], Features]) -> Features:
    """``compute()`` once per key: load ``cache_dir/features_<key>.pt`` when present, else compute and save it.

    With ``cache_dir=None`` this is just ``compute()``. Rank 0 writes (atomically); all ranks compute together.
    """
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"features_{key}.pt"
    if path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("features loaded from cache %s", path)
            return feats
        except Exception as err:  # a corrupt cache entry is recomputed, never trusted
            logger.warning("ignoring unreadable feature cache %s (%s)", path, err)
    feats = compute()
    if is_main_process():
        with atomic_open(path, "wb") as f:
            torch.save(feats, f)
        logger.info("features cached in %s", path)
    barrier()
    return feats
