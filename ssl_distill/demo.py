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


def pixel_knn(data: tuple[Path, Path], ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Weighted k-NN top-1 (%) on raw (per-image centred) pixels, per ``k``: what a learned representation has to
    beat on such small, clean images. ``data`` is ``(train_dir, val_dir)`` of class folders."""
    from ssl_distill.data import build_image_dataset
    from ssl_distill.eval.knn import knn_accuracy

    def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_image_dataset(path, labelled=True, bad_image_policy="error")
        x = torch.stack([torch.frombuffer(bytearray(ds[i][0].convert("L").tobytes()), dtype=torch.uint8).float()
                         for i in range(len(ds))])
        return x - x.mean(1, keepdim=True), torch.tensor(ds.targets)

    (xt, yt), (xv, yv) = load(data[0]), load(data[1])
    acc = knn_accuracy(xt, yt, xv, yv, ks=ks, num_classes=len(set(yt.tolist())))
    return {k: acc[k]["top1"] for k in ks}


LOSS_KEYS = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")
# Collapse statistics (ssl_distill.losses.collapse), all on a 0..1 scale: entropies and information in ln K,
# cross-entropy over its uniform value, CLS spread relative to random directions.
DIAG_KEYS = ("diag_dino_teacher_entropy", "diag_dino_teacher_batch_entropy", "diag_dino_teacher_info",
             "diag_dino_ce_ratio", "diag_ibot_teacher_entropy", "diag_ibot_teacher_info", "diag_ibot_ce_ratio",
             "diag_cls_std")


def _plot_losses(output_dir: Path, run_dir: Path) -> Path:
    """``loss_curve.png``: the losses (left) and the collapse statistics (right) per logged iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssl_distill.train.diagnostics import INFO_MIN
    from ssl_distill.train.metrics import read_metrics

    records = read_metrics(run_dir)
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, keys in ((ax, LOSS_KEYS), (dx, DIAG_KEYS)):
        for key in keys:  # a loss with weight 0 is not computed, so not logged
            points = [(r["iteration"], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), label=key.removeprefix("diag_"), ls="--" if "ibot" in key else "-")
        axis.set_xlabel("iteration")
        axis.legend(fontsize=7)
    ax.set_ylabel("loss")
    ax.set_title("losses")
    dx.axhline(INFO_MIN, color="red", lw=0.8, ls=":", label="collapse threshold (teacher info)")
    dx.axhline(1.0, color="grey", lw=0.8, ls=":")
    dx.set_ylim(-0.02, 1.1)
    dx.set_title("collapse statistics (entropy, info in ln K; CE / ln K; CLS std x sqrt(D))")
    dx.title.set_fontsize(9)
    fig.suptitle("ssl-distill demo: pretraining on handwritten digits")
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
    from ssl_distill.train.diagnostics import replay_collapse_monitor
    from ssl_distill.train.metrics import read_metrics
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
    # both rows from the run's own config, overrides included: the random network has the run's architecture, init
    # (student.weight_init) and seed (train.seed)
    run_config = str(run_dir / "config.yaml")
    rows = [
        _knn_row("random init", "random", run_config, data, size),
        _knn_row("pretrained teacher", str(summary["teacher_backbone"]), run_config, data, size),
        {"backbone": "raw pixels (reference)", **{f"k={k} top-1 (%)": round(v, 2) for k, v in pixel_knn(data).items()}},
    ]
    curve = _plot_losses(output_dir, run_dir)
    collapse = replay_collapse_monitor(cfg, read_metrics(run_dir))
    results = {"rows": rows, "train_images": TRAIN_PER_CLASS * 10, "val_images": VAL_PER_CLASS * 10,
               "run_dir": str(run_dir), "loss_curve": str(curve), "collapse_warning": collapse}
    atomic_write_text(output_dir / "demo_results.json", json.dumps(results, indent=2) + "\n")
    print(f"\n[demo] weighted k-NN on {VAL_PER_CLASS * 10} held-out digits "
          f"(memory bank: {TRAIN_PER_CLASS * 10} train digits)\n")
    print(_table(rows))
    if collapse:
        print(f"\n[demo] WARNING: {collapse}")
    print(f"\n[demo] outputs: {run_dir} (checkpoints, training_metrics.jsonl, teacher_backbone.pth), {curve}, "
          f"{output_dir / 'demo_results.json'}")
    return 0
