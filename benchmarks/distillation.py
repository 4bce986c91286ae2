"""Does distillation deliver? Teacher, scratch student, distilled students (both recipes), continued pretraining.

On the bundled handwritten digits (scikit-learn, 32 px; 1,200 train images for training and as the k-NN memory
bank, 500 held-out for evaluation), every model trained with ``ssl-distill train`` in a subprocess — the real path:

1. a ViT-S teacher pretrained from scratch for ``--teacher-epochs``;
2. a ViT-Ti pretrained from scratch for ``--student-epochs`` (the baseline a distilled student must beat);
3. the same ViT-Ti distilled from the teacher's checkpoint with the DINOv2-paper recipe (``heads``);
4. the same ViT-Ti distilled from the teacher's exported backbone, head-free (``features``); both distilled students
   start from a weight selection of the teacher (``distill.student_init=auto``);
5. continued pretraining: a ViT-S starting from the teacher's exported backbone (official layout) for
   ``--student-epochs``, against 6. the same ViT-S from random init for as many iterations.

Reports weighted k-NN top-1 (k = 20, T = 0.07) of each exported model on the held-out split, with its iterations and
wall-clock minutes, as a table and JSON (``benchmarks/results/distillation.json``)::

    .venv/bin/python benchmarks/distillation.py --config configs/small_data.yaml --out-dir /tmp/distillation
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from _common import print_table, write_json  # noqa: E402

from ssl_distill.data.digits import write_digits_folders  # noqa: E402


def train(out: Path, config: str, overrides: list[str]) -> float:
    """``ssl-distill train`` into ``out``; wall-clock minutes (a finished run is reused with the minutes it
    recorded)."""
    record = out / "wall_minutes.txt"
    if (out / "teacher_backbone.pth").exists():
        return float(record.read_text()) if record.exists() else float("nan")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "ssl_distill.cli", "train", "--config-file", config, "--output-dir", str(out),
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    minutes = (time.perf_counter() - t0) / 60
    record.write_text(f"{minutes:.2f}\n")
    return minutes


def knn(run: Path, data: tuple[Path, Path], ks: tuple[int, ...] = (20,)) -> float:
    """k-NN top-1 (%) of a run's exported model (``teacher_backbone.pth``: the EMA model), architecture from its
    ``config.yaml``."""
    from ssl_distill.eval.data import load_labelled_datasets
    from ssl_distill.eval.knn import backbone_knn_top1
    from ssl_distill.eval.transforms import make_eval_transform
    from ssl_distill.hub import resolve_backbone

    model, _ = resolve_backbone(str(run / "teacher_backbone.pth"), str(run / "config.yaml"))
    size = model.patch_embed.img_size
    transform = make_eval_transform(size)
    train_set, val_set = load_labelled_datasets(str(data[0]), str(data[1]), transform, transform)
    return round(backbone_knn_top1(model, train_set, val_set, ks)[ks[0]], 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo_digits.yaml"))
    p.add_argument("--teacher-arch", default="vit_small")
    p.add_argument("--student-arch", default="vit_tiny")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student-epochs", type=int, default=5)
    p.add_argument("--distill-overrides", nargs="*", default=[],
                   help="config overrides of the two distillation rows, e.g. optim.base_lr=0.004 or "
                        "distill.student_init=random")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="key=value overrides for every run (e.g. crops.local_crops_number=4)")
    p.add_argument("--out-dir", default="/tmp/ssl_distill_distillation")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    data = write_digits_folders(out / "digits", 120, 50)
    base = [f"train.dataset_path={data[0]}", *args.overrides]
    teacher = out / "teacher"
    teacher_ckpt = lambda: sorted(teacher.glob("model_*.pth"))[-1]  # noqa: E731
    teacher_cfg = str(teacher / "config.yaml")
    student = [f"student.arch={args.student_arch}", f"optim.epochs={args.student_epochs}"]
    distill = ["train.mode=distill", *args.distill_overrides]
    runs: list[tuple[str, Path, list[str]]] = [
        ("teacher (from scratch)", teacher,
         [f"student.arch={args.teacher_arch}", f"optim.epochs={args.teacher_epochs}"]),
        ("student from scratch", out / "scratch", student),
        ("student distilled, heads recipe", out / "distill_heads",
         [*student, *distill, "distill.recipe=heads", "distill.teacher_weights={ckpt}"]),
        ("student distilled, features recipe", out / "distill_features",
         [*student, *distill, "distill.recipe=features", f"distill.teacher_weights={teacher / 'teacher_backbone.pth'}",
          f"distill.teacher_config={teacher_cfg}"]),
        ("teacher arch, continued from the teacher's export", out / "continued",
         [f"student.arch={args.teacher_arch}", f"optim.epochs={args.student_epochs}", "optim.freeze_backbone_epochs=1",
          f"student.pretrained_weights={teacher / 'teacher_backbone.pth'}"]),
        ("teacher arch, random init, same iterations", out / "random_init",
         [f"student.arch={args.teacher_arch}", f"optim.epochs={args.student_epochs}"]),
    ]
    rows: list[dict[str, Any]] = []
    for name, run, overrides in runs:
        overrides = [o.replace("{ckpt}", str(teacher_ckpt())) if "{ckpt}" in o else o for o in overrides]
        minutes = train(run, args.config, [*base, *overrides])
        from ssl_distill.config import load_config

        cfg = load_config(run / "config.yaml")
        rows.append({"model": name, "arch": f"{cfg.student.arch}/{cfg.student.patch_size}",
                     "iterations": cfg.optim.epochs * cfg.train.iters_per_epoch,
                     "minutes": round(minutes, 1), "knn20_top1": knn(run, data)})
        print(rows[-1], flush=True)
    print_table(rows, ["model", "arch", "iterations", "minutes", "knn20_top1"])
    write_json("distillation", {"args": vars(args), "rows": rows}, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
