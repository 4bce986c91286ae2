"""Distillation step vs pretraining step of the same student, in one run.

The distillation step (``train.mode=distill``, head-free ``features`` recipe) adds a frozen teacher's forward pass
(no backward, no EMA of it) on every crop; the pretraining step has the EMA teacher's forward on the 2 global crops.
Both get the same batch (crops of the DINOv2 recipe: 2 x 224 + 8 x 98 px by default) and alternate in this process;
the median of ``--repeats`` steps is reported with the ratio distill / pretrain and the frozen teacher's share of
the step (its forward alone, timed the same way). The teacher's weights are random (the cost does not depend on
them) and go through the real path: a file in the official layout, loaded by ``distill.teacher_weights``.

CPU (ViT-L/14 -> ViT-S/14, a few minutes)::

    .venv/bin/python benchmarks/distill_step.py --teacher vit_large --student vit_small --batch 2 --repeats 3

GPU: add ``--device cuda --batch 32``. Writes ``benchmarks/results/distill_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import PeakMemory, environment, median, print_table, time_alternating, write_json  # noqa: E402
from train_step import OursStep, make_batch, make_config  # noqa: E402

from ssl_distill.models import build_backbone  # noqa: E402
from ssl_distill.train.distill_arch import DistillMetaArch  # noqa: E402


class DistillStep(OursStep):
    """:class:`train_step.OursStep` with the distillation architecture instead of self-distillation."""

    def __init__(self, cfg: Any, device: torch.device, amp: torch.dtype | None) -> None:
        super().__init__(cfg, device, amp, {})

    def _build_arch(self, cfg: Any) -> Any:
        return DistillMetaArch(cfg)


def teacher_file(args: argparse.Namespace, folder: Path) -> Path:
    torch.manual_seed(1)
    teacher = build_backbone(args.teacher, patch_size=args.patch_size, img_size=args.global_size, init_values=1e-5)
    path = folder / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="vit_large")
    p.add_argument("--student", default="vit_small")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    batch = make_batch(args)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_file(args, Path(tmp))
        base = make_config(args, args.student)
        distill_cfg = base.copy()
        distill_cfg.train.mode = "distill"
        distill_cfg.distill.update(teacher_weights=str(teacher), recipe="features",
                                   teacher_overrides=[f"student.arch={args.teacher}",
                                                      f"student.patch_size={args.patch_size}",
                                                      f"crops.global_crops_size={args.global_size}"])
        with torch.device(device):
            torch.manual_seed(0)
            pretrain = OursStep(base, device, amp, {})
            torch.manual_seed(0)
            distill = DistillStep(distill_cfg, device, amp)
    frozen = distill.meta.frozen.backbone
    crops = [batch["global_crops"].to(device), batch["local_crops"].to(device)]

    def teacher_forward() -> None:
        with torch.no_grad():
            frozen.forward_train(crops)

    fns = {"pretrain": lambda: pretrain(batch), "distill": lambda: distill(batch), "teacher forward": teacher_forward}
    times = time_alternating(fns, args.repeats, device, warmup=args.warmup)
    rows = []
    for name, fn in fns.items():
        with PeakMemory(device) as pm:
            fn()
        rows.append({"step": name, "median_s": round(median(times[name]), 3), "peak_mb": round(pm.peak / 2**20)})
    ratio = median(times["distill"]) / median(times["pretrain"])
    share = median(times["teacher forward"]) / median(times["distill"])
    print_table(rows, ["step", "median_s", "peak_mb"])
    print(f"distill / pretrain = {ratio:.2f}x; the frozen {args.teacher} forward is {share:.0%} of the distill step")
    write_json(f"distill_step_{device.type}", {"args": vars(args), "environment": environment(), "rows": rows,
                                               "distill_over_pretrain": ratio, "teacher_forward_share": share,
                                               "times": times}, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
