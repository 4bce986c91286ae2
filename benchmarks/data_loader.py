"""Can the data pipeline feed the GPU? The training DataLoader's images/s with N workers against the step's images/s.

It builds the loader exactly as training does (:func:`ssl_distill.data.pipeline.build_train_loader`: seeded multi-crop
augmentation, the iBOT-masking collator, pinned memory on CUDA) over a folder of real JPEG photos at ImageNet-like
sizes (the bundled sample photographs, cropped and re-encoded at 500 x 375, quality 90), moves every batch to the
device as the step does, and counts images per second in the steady state (after ``--warmup-s``, so the batches the
workers prefetched while starting do not count) for each ``--workers`` value.

With ``--step-json`` (``train_step.py`` results), it compares with each architecture's step rate (``ours/default``):
``feed_ratio`` = loader images/s at the largest worker count / step images/s (>= 1: the GPU never waits for data),
and ``workers_needed`` = step images/s / images/s per worker at that count (rounded up; per-worker rates fall as
workers compete for cores, so this extrapolates from the most loaded measurement). GPU check (16 cores)::

    python benchmarks/data_loader.py --device cuda --workers 4 8 12 --step-json results/train_step_cuda_*.json

Bounded in time: the measurements share ``--budget-s`` (each worker count gets an equal part of what is left, warm-up
and measured seconds shrunk alike), every batch must arrive within ``--batch-timeout-s`` (else the run stops with one
message naming the worker count), each loader's workers are shut down before the next one starts, and every row is
printed and written to the JSON as soon as it is measured, so a run killed from outside still leaves its rows. (The
H200 run was killed at 45 s: 3 x (2 + 7 s) of measurement after ~15 s of start-up, with nothing printed before the
end, looked like a hang; its ``resource_sharer`` traceback was the pin-memory thread losing its workers to the kill.)

Writes ``data_loader.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, sync, write_json  # noqa: E402

from ssl_distill.config import load_config  # noqa: E402
from ssl_distill.data.pipeline import build_train_dataset, build_train_loader  # noqa: E402
from ssl_distill.data.sample_images import sample_photos  # noqa: E402


def write_photo_folder(root: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` JPEG files of ``size`` (w, h): varied crops of the sample photographs, re-encoded at quality 90."""
    g = torch.Generator().manual_seed(0)
    photos = [p.convert("RGB") for p in sample_photos()]
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * (0.6 + 0.4 * torch.rand(1, generator=g))), int(h * (0.6 + 0.4 * torch.rand(1, generator=g)))
        x, y = int((w - cw) * torch.rand(1, generator=g)), int((h - ch) * torch.rand(1, generator=g))
        img.crop((x, y, x + cw, y + ch)).resize(size).save(root / f"photo_{i:04d}.jpg", quality=90)
    return root


def loader_config(args: argparse.Namespace, folder: Path, workers: int) -> Any:
    return load_config(None, [
        f"train.dataset_path={folder}", f"train.batch_size_per_gpu={args.batch}", f"train.num_workers={workers}",
        f"student.patch_size={args.patch_size}", f"crops.global_crops_size={args.global_size}",
        f"crops.local_crops_size={args.local_size}", f"crops.local_crops_number={args.local_crops}",
    ])


class LoaderStalled(RuntimeError):
    """A batch did not arrive within ``--batch-timeout-s``."""


def measure(args: argparse.Namespace, folder: Path, workers: int, device: torch.device,
            share_s: float | None = None) -> dict[str, Any]:
    """Steady-state images/s of the training loader with ``workers`` worker processes, in about ``share_s`` seconds
    of warm-up + measurement (default ``--warmup-s`` + ``--seconds``); the workers are shut down on return."""
    warmup_s, seconds = args.warmup_s, args.seconds
    if share_s is not None and share_s < warmup_s + seconds:
        scale = max(share_s, 0.0) / (warmup_s + seconds)
        warmup_s, seconds = warmup_s * scale, seconds * scale
    t_start = time.perf_counter()
    cfg = loader_config(args, folder, workers)
    loader = build_train_loader(cfg, build_train_dataset(cfg), 0, pin_memory=device.type == "cuda",
                                timeout_s=args.batch_timeout_s)
    try:
        return _timed_rates(loader, workers, device, warmup_s, seconds, t_start, args.batch)
    except RuntimeError as err:
        if "timed out" not in str(err):
            raise
        raise LoaderStalled(f"data_loader: no batch within --batch-timeout-s {args.batch_timeout_s:g} s with "
                            f"{workers} workers (pin_memory={device.type == 'cuda'}); the loader is stuck or far "
                            "too slow for this machine") from None
    finally:
        loader = None
        gc.collect()  # the loader's iterator shuts its workers down when freed: before the next count starts them


def _timed_rates(loader: Any, workers: int, device: torch.device, warmup_s: float, seconds: float, t_start: float,
                 batch: int) -> dict[str, Any]:
    it = iter(loader)

    def take() -> None:
        batch = next(it)
        for key in ("global_crops", "local_crops", "masks", "mask_indices"):
            batch[key].to(device, non_blocking=True)

    take()  # the first batch waits for the workers to start
    first_batch_s = time.perf_counter() - t_start
    end_warmup = time.perf_counter() + warmup_s
    while time.perf_counter() < end_warmup:
        take()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        take()
        n += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    rate = n * batch / elapsed
    return {"workers": workers, "images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1),
            "batches": n, "seconds": elapsed, "first_batch_s": first_batch_s}


def step_rates(paths: list[str]) -> dict[str, float]:
    """``arch -> images/s`` of ``ours/default`` in train_step.py result files (missing or failed files skipped)."""
    rates = {}
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for row in payload.get("rows", []):
            if row.get("impl") == "ours/default":
                rates[row["arch"]] = float(row["img_per_s"])
    return rates


def feed_rows(loader_rows: list[dict[str, Any]], rates: dict[str, float]) -> list[dict[str, Any]]:
    """Per architecture: can the largest measured worker count feed its step, and how many workers would."""
    top = max(loader_rows, key=lambda r: r["workers"])
    per_worker = top["images_per_s_per_worker"]
    return [{"arch": arch, "step_img_per_s": rate, "loader_workers": top["workers"],
             "loader_img_per_s": top["images_per_s"], "feed_ratio": top["images_per_s"] / rate,
             "workers_needed": math.ceil(rate / per_worker) if top["workers"] > 0 else None}
            for arch, rate in sorted(rates.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8, 12], help="num_workers values to measure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64, help="images per batch (the recipe's batch_size_per_gpu)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--images", type=int, default=256, help="JPEG files in the folder (cycled through)")
    p.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--warmup-s", type=float, default=2.0, help="seconds of batches not counted, per worker count")
    p.add_argument("--seconds", type=float, default=7.0, help="seconds measured per worker count")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all warm-ups and measurements together (default: no limit)")
    p.add_argument("--batch-timeout-s", type=float, default=60.0,
                   help="stop with an error when a batch takes longer than this (the first one included)")
    p.add_argument("--step-json", nargs="*", default=[], help="train_step.py result files to compare with")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photo_folder(Path(tmp), args.images, tuple(args.image_size))
        for i, w in enumerate(args.workers):
            share = None if deadline is None else (deadline - time.perf_counter()) / (len(args.workers) - i)
            try:
                rows.append(measure(args, folder, w, device, share))
            except LoaderStalled as err:
                raise SystemExit(str(err)) from None
            print(f"workers {w}: {rows[-1]['images_per_s']:.0f} images/s", flush=True)
            write_json("data_loader", {"args": vars(args), "rows": rows, "feed": [], "partial": True}, args.out_dir)
    print_table(rows, ["workers", "images_per_s", "images_per_s_per_worker", "first_batch_s"])
    feed = feed_rows(rows, step_rates(args.step_json))
    if feed:
        print_table(feed, ["arch", "step_img_per_s", "loader_workers", "loader_img_per_s", "feed_ratio",
                           "workers_needed"])
    payload = {"args": vars(args), "rows": rows, "feed": feed}
    write_json("data_loader", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
