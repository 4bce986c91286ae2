"""Folder vs tar shards: file-system operations per epoch, time to the first batch, and images/s with N workers.

It writes ``--images`` small PNGs (the scikit-learn digits at ``--image-size`` px, as a 10-class folder tree), packs
them with ``ssl-distill shards`` (:func:`ssl_distill.data.pack.pack_shards`, timed), then reads one epoch of each
dataset in a random order (a permutation of all indices, as the training sampler gives) through a DataLoader with
``--workers`` processes, every image fully decoded as training decodes it:

* ``fs_ops_startup``: opens + stats (``open``, ``os.open``, ``stat``/``lstat``/``fstat``, ``scandir``/``listdir``,
  counted by wrapping them in Python) while the dataset is built (the folder scan vs reading the shard list);
* ``fs_ops_epoch``: the same, summed over the workers, for the epoch (one ``open`` per image vs one ``open`` +
  ``fstat`` per shard and worker, plus each shard's member table);
* ``first_batch_s``: from building the dataset to the first batch out of the loader (workers started);
* ``images_per_s``: the epoch's images after the first batch over the time they took.

With ``wids`` importable (``pip install wids``) it also reads the same shards through ``wids.ShardListDataset``
(our ``index.json`` is a wids shard index), with its default LRU of 10 open shards (``--wids-lru``): the library
the issue suggests.
Page cache: the files were just written, so both read from memory; on a cluster file system every operation
counted here is a metadata round trip. The README's table::

    python benchmarks/shards.py --images 200000 --workers 2

Writes ``shards.json``.
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_json  # noqa: E402

from ssl_distill.data.datasets import build_image_dataset, load_rgb  # noqa: E402
from ssl_distill.data.digits import _load_digits, _to_png  # noqa: E402
from ssl_distill.data.pack import pack_shards, parse_size  # noqa: E402

_COUNTED = {"builtins.open": (builtins, "open"), "io.open": (io, "open"), "os.open": (os, "open"),
            "os.stat": (os, "stat"), "os.lstat": (os, "lstat"), "os.fstat": (os, "fstat"),
            "os.scandir": (os, "scandir"), "os.listdir": (os, "listdir")}
COUNTS = {"ops": 0}
WIDS_LRU = [10]  # --wids-lru


def install_counters() -> None:
    """Count every call of the functions in :data:`_COUNTED` (once per process; forked workers inherit them)."""
    for module, name in _COUNTED.values():
        real = getattr(module, name)
        if getattr(real, "_counted", False):
            continue

        def counted(*args: Any, _real: Callable = real, **kwargs: Any) -> Any:
            COUNTS["ops"] += 1
            return _real(*args, **kwargs)

        counted._counted = True  # type: ignore[attr-defined]
        setattr(module, name, counted)


def write_digit_folder(root: Path, n: int, size: int) -> Path:
    """``n`` PNGs ``root/<digit>/<i>.png`` of the digits (each encoded once, written as many times as needed)."""
    images, labels = _load_digits()
    encoded = []
    for image in images:
        buf = io.BytesIO()
        _to_png(image, size).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    for d in range(10):
        (root / str(d)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        j = i % len(images)
        (root / str(int(labels[j])) / f"{i:07d}.png").write_bytes(encoded[j])
    return root


class _Decoded(torch.utils.data.Dataset):
    """``dataset[i]`` decoded to a uint8 tensor (the work every variant does); ``wids`` samples decoded likewise."""

    def __init__(self, dataset: Any, wids: bool = False) -> None:
        self.dataset, self.wids = dataset, wids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.wids:
            sample = self.dataset[i]
            img = load_rgb(sample[".png"])  # wids hands out the member as a file object
        else:
            img = self.dataset[i][0]
        return torch.from_numpy(np.array(img))


def _reset_counts(worker_id: int) -> None:
    COUNTS["ops"] = 0


def _collate(batch: list[torch.Tensor]) -> tuple[int, int, int]:
    info = torch.utils.data.get_worker_info()
    return len(batch), info.id if info else -1, COUNTS["ops"]


def build(kind: str, folder: Path, shards: Path) -> Any:
    if kind == "folder":
        return _Decoded(build_image_dataset(folder, bad_image_policy="error"))
    if kind == "shards":
        return _Decoded(build_image_dataset(shards, bad_image_policy="error"))
    import wids

    return _Decoded(wids.ShardListDataset(str(shards / "index.json"), localname=lambda url: url,
                                          transformations=lambda s: s, lru_size=WIDS_LRU[0]), wids=True)


def measure(kind: str, folder: Path, shards: Path, workers: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """One epoch of ``kind`` in a random order; see the module docstring for the columns."""
    COUNTS["ops"] = 0
    t0 = time.perf_counter()
    dataset = build(kind, folder, shards)
    startup_s, startup_ops = time.perf_counter() - t0, COUNTS["ops"]
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=order, num_workers=workers,
                                         collate_fn=_collate, worker_init_fn=_reset_counts if workers else None)
    per_worker: dict[int, int] = {}
    images = 0
    first = None
    for n, worker, ops in loader:
        if first is None:
            first = time.perf_counter()
            first_n = n
        images += n
        per_worker[worker] = ops
    end = time.perf_counter()
    epoch_ops = sum(per_worker.values()) - (startup_ops if workers == 0 else 0)
    return {"data": kind, "images": images, "workers": workers, "fs_ops_startup": startup_ops,
            "fs_ops_epoch": epoch_ops, "fs_ops_per_image": epoch_ops / images, "startup_s": startup_s,
            "first_batch_s": first - t0, "images_per_s": (images - first_n) / max(end - first, 1e-9)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--shard-size", default="64MB")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--pack-workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--no-wids", action="store_true", help="skip the wids row even when wids is installed")
    p.add_argument("--wids-lru", type=int, default=10, help="shards wids keeps open per worker (its default: 10)")
    p.add_argument("--work-dir", default=None, help="where the images and shards go (default: a temp folder)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    WIDS_LRU[0] = args.wids_lru
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        folder, shards = Path(work) / "folder", Path(work) / "shards"
        t0 = time.perf_counter()
        write_digit_folder(folder, args.images, args.image_size)
        write_s = time.perf_counter() - t0
        summary = pack_shards(folder, shards, parse_size(args.shard_size), args.pack_workers, progress=False)
        print(f"wrote {args.images} images in {write_s:.1f} s; packed them into {summary.shards} shards in "
              f"{summary.seconds:.1f} s", flush=True)
        install_counters()
        kinds = ["folder", "shards"]
        try:
            import wids  # noqa: F401

            kinds += [] if args.no_wids else ["wids"]
        except ImportError:
            pass
        rows = [measure(kind, folder, shards, args.workers, args.batch) for kind in kinds]
    base = rows[0]
    for r in rows:
        r["startup_speedup"] = base["first_batch_s"] / r["first_batch_s"]
        r["throughput_ratio"] = r["images_per_s"] / base["images_per_s"]
        r["shards"] = summary.shards
    print_table(rows, ["data", "images", "shards", "workers", "fs_ops_startup", "fs_ops_epoch", "fs_ops_per_image",
                       "startup_s", "first_batch_s", "startup_speedup", "images_per_s", "throughput_ratio"])
    write_json("shards", {"args": vars(args), "pack_s": summary.seconds, "shard_bytes": summary.bytes,
                          "rows": rows}, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
