"""Multi-crop augmentation throughput per worker: ours vs a torchvision-PIL pipeline configured like DINOv2's.

Both decode the same real JPEG photos (scikit-learn / scikit-image sample photographs, re-encoded at quality 90)
and produce 2 global (224 px) + 8 local (96 px) normalised float crops per image with the same operations and
probabilities (RandomResizedCrop bicubic, flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2,
9x9 Gaussian blur 1.0 / 0.1 / 0.5, solarize 0.2 on global crop 2, ImageNet normalisation).

- ``reference``: DINOv2's ``DataAugmentationDINO`` shape: ``torchvision.transforms`` (v1) on PIL images,
  ``ToTensor`` + ``Normalize`` at the end; decoding with PIL.
- ``ours``: :class:`ssl_distill.data.MultiCropAugmentation` (``transforms.v2`` on ``uint8`` tensors until the
  final normalisation, with OpenCV colour jitter and blur, a channels-last crop and a fused float normalisation);
  decoding with PIL exactly as our datasets do (``load_rgb``).

One thread (``torch.set_num_threads(1)``; OpenCV is single-threaded by ``MultiCropAugmentation``), as in a DataLoader
worker; runs alternate, median of ``--repeats``::

    .venv/bin/python benchmarks/data_pipeline.py

Writes ``benchmarks/results/data_pipeline.json``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median, print_table, time_alternating, write_json  # noqa: E402

from ssl_distill.data.augment import MultiCropAugmentation  # noqa: E402
from ssl_distill.data.sample_images import sample_photos  # noqa: E402


def jpeg_photos(quality: int = 90) -> list[bytes]:
    """The bundled sample photographs as RGB JPEG files (bytes)."""
    out = []
    for img in sample_photos():
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_pil(data: bytes) -> Image.Image:
    """Decode like our datasets: open, fully load, convert to RGB."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def reference_augmentation(global_size: int = 224, local_size: int = 96, n_local: int = 8) -> Any:
    """DINOv2's augmentation built from ``torchvision.transforms`` v1 on PIL images (blur probabilities as ours)."""
    from torchvision import transforms as T

    def pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0) -> T.Compose:
        steps = [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p),
        ]
        if solarize_p:
            steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
        steps += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        return T.Compose(steps)

    g1 = pipeline(global_size, (0.32, 1.0), 1.0)
    g2 = pipeline(global_size, (0.32, 1.0), 0.1, 0.2)
    loc = pipeline(local_size, (0.05, 0.32), 0.5)

    def augment(img: Image.Image) -> dict[str, list[torch.Tensor]]:
        return {"global_crops": [g1(img), g2(img)], "local_crops": [loc(img) for _ in range(n_local)]}

    return augment


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    photos = jpeg_photos()
    ours = MultiCropAugmentation(local_crops_number=args.local_crops)
    ref = reference_augmentation(n_local=args.local_crops)
    n = args.images

    def loop(fn: Any) -> None:
        for i in range(n):
            fn(decode_pil(photos[i % len(photos)]))

    # Both return the same structure, shapes and dtypes.
    a, b = ours(decode_pil(photos[0])), ref(decode_pil(photos[0]))
    shapes = [[t.shape for t in d["global_crops"] + d["local_crops"]] for d in (a, b)]
    assert shapes[0] == shapes[1], shapes
    t0 = time.perf_counter()
    times = time_alternating({"torchvision-PIL (DINOv2)": lambda: loop(ref), "ours": lambda: loop(ours)},
                             args.repeats, torch.device("cpu"), warmup=1)
    base = median(times["torchvision-PIL (DINOv2)"])
    rows = [{"pipeline": k, "images_per_s": n / median(v), "speedup": base / median(v),
             "ms_per_image": 1e3 * median(v) / n, "times_s": v} for k, v in times.items()]
    print(f"{n} images x {args.repeats} repeats, {args.threads} thread(s), {time.perf_counter() - t0:.0f} s")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=28, help="images per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DataLoader worker)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    rows = run(args)
    print_table(rows, ["pipeline", "images_per_s", "ms_per_image", "speedup"])
    write_json("data_pipeline", {"args": vars(args), "rows": rows}, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
