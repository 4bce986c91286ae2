"""``ssl-distill demo`` (``make demo``): the main job on built-in data, end to end, on a CPU in a few minutes.

1. Writes scikit-learn's handwritten digits (real scans, 10 classes) as 32 px PNG class folders: a train split for
   pretraining and as the k-NN memory bank, a held-out val split for evaluation.
2. Pretrains a tiny ViT with the full recipe (``configs/demo_digits.yaml``: DINO + iBOT + KoLeo, multi-crop,
   EMA teacher) on the train images, ignoring their labels.
3. Measures weighted k-NN accuracy on the val split for the random-initialised backbone and the pretrained teacher,
   prints the table, and leaves checkpoints, metrics, a loss-curve PNG and ``demo_results.json`` in the output dir.

Running it again in the same output directory resumes (or reuses) the finished run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ssl_distill.fileio import atomic_write_text

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_digits.yaml"
TRAIN_PER_CLASS, VAL_PER_CLASS = 120, 50
KS = (10, 20)


def _knn_row(name: str, weights: str, config_file: str, data: tuple[Path, Path], image_size: int) -> dict[str, Any]:
    from ssl_distill.eval.data import load_labelled_datasets
    from ssl_distill.eval.knn import backbone_knn_top1
    from ssl_distill.eval.transforms import make_eval_transform
    from ssl_distill.hub import resolve_backbone

    model, _ = resolve_backbone(weights, config_file)
    transform = make_eval_transform(image_size)
    train, val = load_labelled_datasets(str(data[0]), str(data[1]), transform, transform)
    top1 = backbone_knn_top1(model, train, val, KS, desc=name)
    return {"backbone": name, **{f"k={k} top-1 (%)": round(top1[k], 2) for k in KS}}


def _pixel_row(data: tuple[Path, Path]) -> dict[str, Any]:
    """The same k-NN on raw pixels: what a learned representation has to beat on such small, clean images."""
    from ssl_distill.data import build_image_dataset
    from ssl_distill.eval.knn import knn_accuracy

    def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_image_dataset(path, labelled=True, bad_image_policy="error")
        x = torch.stack([torch.frombuffer(bytearray(ds[i][0].convert("L").tobytes()), dtype=torch.uint8).float()
                         for i in range(len(ds))])
        return x - x.mean(1, keepdim=True), torch.tensor(ds.targets)

    (xt, yt), (xv, yv) = load(data[0]), load(data[1])
    acc = knn_accuracy(xt, yt, xv, yv, ks=KS, num_classes=10)
    return {"backbone": "raw pixels (reference)", **{f"k={k} top-1 (%)": round(acc[k]["top1"], 2) for k in KS}}


def _plot_losses(output_dir: Path, run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssl_distill.train.metrics import read_metrics

    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"):
        if key in records[0]:  # a loss with weight 0 is not computed, so not logged
            ax.plot([r["iteration"] for r in records], [r[key] for r in records], label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("ssl-distill demo: pretraining on handwritten digits")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "-+-".join("-" * w for w in widths)
    body = [" | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def run_demo(args: argparse.Namespace) -> int:
    from ssl_distill.config import load_config
    from ssl_distill.data.digits import write_digits_folders
    from ssl_distill.train.trainer import train

    output_dir = Path(args.output_dir)
    config_file = args.config_file or str(DEMO_CONFIG)
    data = write_digits_folders(output_dir / "digits", TRAIN_PER_CLASS, VAL_PER_CLASS)
    cfg = load_config(config_file, [f"train.dataset_path={data[0]}", *args.opts])
    run_dir = output_dir / "run"
    print(f"[demo] pretraining {cfg.student.arch}/{cfg.student.patch_size} for "
          f"{cfg.optim.epochs * cfg.train.iters_per_epoch} iterations on {data[0]} (CPU: a few minutes) ...")
    summary = train(cfg, run_dir)
    size = cfg.crops.global_crops_size
    rows = [
        _knn_row("random init", "random", config_file, data, size),
        _knn_row("pretrained teacher", str(summary["teacher_backbone"]), str(run_dir / "config.yaml"), data, size),
        _pixel_row(data),
    ]
    curve = _plot_losses(output_dir, run_dir)
    results = {"rows": rows, "train_images": TRAIN_PER_CLASS * 10, "val_images": VAL_PER_CLASS * 10,
               "run_dir": str(run_dir), "loss_curve": str(curve)}
    atomic_write_text(output_dir / "demo_results.json", json.dumps(results, indent=2) + "\n")
    print(f"\n[demo] weighted k-NN on {VAL_PER_CLASS * 10} held-out digits "
          f"(memory bank: {TRAIN_PER_CLASS * 10} train digits)\n")
    print(_table(rows))
    print(f"\n[demo] outputs: {run_dir} (checkpoints, training_metrics.jsonl, teacher_backbone.pth), {curve}, "
          f"{output_dir / 'demo_results.json'}")
    return 0
