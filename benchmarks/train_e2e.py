"""End to end: ``ssl-distill train`` on a folder of JPEG photos, against the step benchmark — does the whole loop
(loader, host work, logging, checkpoints) run at the speed of the bare step?

It writes ``--images`` JPEG photos (:func:`data_loader.write_photo_folder`: crops of the bundled photographs at
ImageNet-like sizes), runs ``ssl-distill train`` in a subprocess for ``--iterations`` with a config (default
``configs/vits14_default.yaml``: ViT-S/14, 2 x 224 + 8 x 98 crops, drop path 0.1) and reads
``training_metrics.jsonl``: images/s and data wait per iteration of every log window after the first
(``--skip-windows``: start-up, first kernel plans). With ``--step-json`` (``train_step.py`` results) it reports the
ratio to the step benchmark's ``ours/default`` images/s of the same architecture (issue 25 asks for >= 0.9).

GPU check::

    python benchmarks/train_e2e.py --device cuda --iterations 100 --workers 14 --step-json results/train_step_*.json

Writes ``train_e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_json  # noqa: E402
from data_loader import step_rates, write_photo_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_training(args: argparse.Namespace, folder: Path, out: Path) -> subprocess.CompletedProcess:
    overrides = {
        "train.dataset_path": folder, "train.device": args.device, "train.batch_size_per_gpu": args.batch,
        "train.num_workers": args.workers, "train.iters_per_epoch": args.iterations, "optim.epochs": 1,
        "optim.warmup_epochs": 0, "teacher.warmup_teacher_temp_epochs": 0, "optim.freeze_last_layer_epochs": 0,
        "train.log_period": args.log_period, "train.checkpoint_period": args.iterations + 1,
    }
    cmd = [sys.executable, "-m", "ssl_distill.cli", "train", "--config-file", args.config, "--output-dir", str(out),
           *[f"{k}={v}" for k, v in overrides.items()], *args.overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)


def summarise(records: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    """Median images/s and data wait per iteration over the log windows after the first ``skip``."""
    steady = records[skip:] or records
    return {"windows": len(steady), "images_per_s": statistics.median(r["images_per_s"] for r in steady),
            "data_time_ms": 1e3 * statistics.median(r["data_time_s"] for r in steady),
            "peak_memory_gib": max(r["peak_memory_mb"] for r in steady) / 1024}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "vits14_default.yaml"))
    p.add_argument("--arch", default="vit_small", help="the config's student.arch, to find its step rate")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--log-period", type=int, default=10)
    p.add_argument("--skip-windows", type=int, default=1, help="log windows not counted (start-up)")
    p.add_argument("--images", type=int, default=1000, help="JPEG files in the folder")
    p.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--step-json", nargs="*", default=[], help="train_step.py result files to compare with")
    p.add_argument("--out-dir", default=None)
    p.add_argument("overrides", nargs="*", help="further config overrides, key=value")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train_e2e_") as tmp:
        (Path(tmp) / "photos").mkdir()
        folder = write_photo_folder(Path(tmp) / "photos", args.images, tuple(args.image_size))
        t0 = time.perf_counter()
        proc = run_training(args, folder, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"ssl-distill train failed with exit code {proc.returncode}")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "training_metrics.jsonl").read_text().splitlines()]
    row = {"arch": args.arch, "batch": args.batch, "workers": args.workers, "iterations": args.iterations,
           **summarise(records, args.skip_windows), "wall_s": wall}
    step = step_rates(args.step_json).get(args.arch)
    if step:
        row.update(step_img_per_s=step, e2e_vs_step=row["images_per_s"] / step)
    print_table([row], ["arch", "batch", "workers", "iterations", "windows", "images_per_s", "data_time_ms",
                        "peak_memory_gib", "step_img_per_s", "e2e_vs_step", "wall_s"])
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": [row]}
    write_json("train_e2e", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
