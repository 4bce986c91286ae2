"""Stochastic depth: ``subset`` (run each branch on the kept samples only) against ``mask`` (run it on every sample and
multiply), at the recipe's rates, on one device — the measurement behind ``student.drop_path_mode=auto``.

One timed call = the student's packed forward + backward over 2 global + n local crops (the training step's
backbone part, with a fixed stochastic-depth plan per call as in training). Both modes draw the same samples and
compute the same numbers; ``subset`` saves a fraction ``p`` of the block work and pays a gather and a scatter per
branch, ``mask`` does all the work with no index traffic. Rate 0 (no stochastic depth) is the reference row.
Runs alternate (rate 0, subset, mask, ...) and the median of ``--repeats`` is reported.

CPU::

    .venv/bin/python benchmarks/drop_path.py --arch vit_small --batch 4 --repeats 5

GPU (``benchmarks/gpu_check.sh`` runs it)::

    python benchmarks/drop_path.py --device cuda --arch vit_small --patch-size 14 --local-size 98 --batch 64 \\
        --dtype bf16

Writes ``benchmarks/results/drop_path_<device>.json``; ``auto`` is what :func:`resolve_drop_path_mode` picks today,
``faster`` what this run measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median, print_table, time_alternating, write_json  # noqa: E402

from ssl_distill.models import build_backbone  # noqa: E402
from ssl_distill.models.stochastic_depth import resolve_drop_path_mode, sample_keys  # noqa: E402


def _step_fn(model: torch.nn.Module, crops: list[torch.Tensor], keys: list[torch.Tensor], dtype: torch.dtype):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(crops[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
            outs = model.forward_train(crops, sample_keys=keys)
        sum(o["x_norm_clstoken"].float().square().sum() + o["x_norm_patchtokens"].float().mean()
            for o in outs).backward()
    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="images per step (each has 2 global + n local crops)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.4])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=0.0, help="stop timing after this many seconds (0: no limit)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    deadline = time.perf_counter() + args.budget_s if args.budget_s > 0 else None
    g = torch.Generator().manual_seed(0)
    b = args.batch
    crops = [torch.randn(2 * b, 3, args.global_size, args.global_size, generator=g).to(device),
             torch.randn(args.n_local * b, 3, args.local_size, args.local_size, generator=g).to(device)]
    positions = torch.arange(b)
    keys = [sample_keys(0, positions, range(2)), sample_keys(0, positions, range(2, 2 + args.n_local))]
    rows = []
    for rate in args.rates:
        fns = {}
        for mode in ("none", "subset", "mask"):
            torch.manual_seed(0)
            model = build_backbone(args.arch, patch_size=args.patch_size, img_size=args.global_size,
                                   drop_path_rate=0.0 if mode == "none" else rate, drop_path_uniform=True,
                                   drop_path_mode="auto" if mode == "none" else mode, init_values=1e-5)
            fns[mode] = _step_fn(model.to(device).train(), crops, keys, dtype)
        times = {k: median(v) for k, v in time_alternating(fns, args.repeats, device, deadline=deadline).items()}
        rows.append({"rate": rate, "no_drop_s": round(times["none"], 4), "subset_s": round(times["subset"], 4),
                     "mask_s": round(times["mask"], 4), "subset_vs_mask": round(times["mask"] / times["subset"], 3),
                     "faster": "subset" if times["subset"] < times["mask"] else "mask",
                     "auto": resolve_drop_path_mode("auto", rate, device)})
    print_table(rows, ["rate", "no_drop_s", "subset_s", "mask_s", "subset_vs_mask", "faster", "auto"])
    payload = {"args": vars(args), "rows": rows}
    write_json(f"drop_path_{device.type}", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
