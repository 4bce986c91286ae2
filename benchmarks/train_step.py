"""Training-step throughput and peak memory: ssl_distill vs a lightly + timm baseline of the same DINOv2 recipe.

One step = teacher forward on the 2 global crops, student forward + backward on 2 global + n local crops, the
DINO head, DINO + iBOT + KoLeo losses, per-part gradient clipping, AdamW, EMA teacher update. Both sides get the
same batch (crops and iBOT masks from our collator) and run in this process with the same threads, alternating
(baseline, ours, baseline, ...); the median of ``--repeats`` steps is reported with the ratio ours / baseline.
FLOPs of one step are counted with ``torch.utils.flop_counter`` and divided by the step time and by the
machine's measured dense matmul peak (fp32 on CPU, bf16 on CUDA) -> MFU.

CPU (defaults, a few minutes)::

    .venv/bin/python benchmarks/train_step.py --arch vit_small vit_base

GPU (the variants of our step; ``benchmarks/gpu_check.sh`` runs ViT-S/B/L/14 this way, each time-boxed)::

    python benchmarks/train_step.py --device cuda --arch vit_large --patch-size 14 --local-size 98 --batch 32 \\
        --variants default no_packed math sdpa xformers checkpointing --budget-s 60

Models are built directly on the device. ``compile`` and ``checkpointing`` are credited with the default variant's
model FLOPs (MFU counts recomputation as overhead; the counter cannot see into compiled code). Without lightly
(``--no-baseline``, or not installed) only our variants are timed and ``speedup`` is empty.

Writes ``benchmarks/results/train_step_<device>.json``. Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    PeakMemory,
    matmul_peak_flops,
    median,
    print_table,
    sync,
    time_alternating,
    write_json,
)
from lightly_baseline import LightlyDINOv2  # noqa: E402

from ssl_distill.config import load_config  # noqa: E402
from ssl_distill.data.collate import collate_data_and_cast  # noqa: E402
from ssl_distill.data.masking import MaskingGenerator  # noqa: E402
from ssl_distill.models.attention import resolve_attn_impl  # noqa: E402
from ssl_distill.train.meta_arch import SSLMetaArch  # noqa: E402
from ssl_distill.train.optim import build_optimizer, param_groups  # noqa: E402

# Our step's variants: name -> (packed student pass, attention kernel, torch.compile per block, act. checkpointing).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_packed": {"packed": False},
    "sdpa": {"attn_impl": "sdpa"},
    "xformers": {"attn_impl": "xformers"},
    "math": {"attn_impl": "math"},
    "compile": {"compile": True},
    "checkpointing": {"checkpointing": True},
    # our step with timm's ViT of the same size behind the backbone contract (student.arch=timm/<arch>_patch16_224,
    # the benchmark's patch size): what the contract costs against our packed ViT
    "timm": {"timm": True},
    # SDPA with one backend forced (CUDA: which kernel suits the recipe's shapes; "default" lets PyTorch choose)
    "flash": {"attn_impl": "sdpa", "sdpa_backend": "FLASH_ATTENTION"},
    "efficient": {"attn_impl": "sdpa", "sdpa_backend": "EFFICIENT_ATTENTION"},
    "cudnn": {"attn_impl": "sdpa", "sdpa_backend": "CUDNN_ATTENTION"},
}


def make_config(args: argparse.Namespace, arch: str) -> Any:
    """Our config for this benchmark (the DINOv2 recipe with the benchmark's sizes)."""
    overrides = [
        f"student.arch={arch}", f"student.patch_size={args.patch_size}", f"student.drop_path_rate={args.drop_path}",
        "student.drop_path_uniform=true", f"crops.global_crops_size={args.global_size}",
        f"crops.local_crops_size={args.local_size}", f"crops.local_crops_number={args.local_crops}",
        f"dino.head_n_prototypes={args.prototypes}", f"ibot.head_n_prototypes={args.prototypes}",
        f"train.batch_size_per_gpu={args.batch}",
    ]
    return load_config(None, overrides)


def make_batch(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """A collated batch of random crops with real iBOT block masks (half the global crops masked)."""
    g = torch.Generator().manual_seed(seed)
    side = args.global_size // args.patch_size
    samples = []
    for _ in range(args.batch):
        crops = {"global_crops": [torch.randn(3, args.global_size, args.global_size, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(3, args.local_size, args.local_size, generator=g)
                                 for _ in range(args.local_crops)]}
        samples.append((crops, None))
    torch.manual_seed(seed)
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32,
                                 mask_generator=MaskingGenerator(side, max_num_patches=0.5 * side * side))


class OursStep:
    """Our step exactly as :meth:`ssl_distill.train.trainer.Trainer.step` runs it (minus logging)."""

    def __init__(self, cfg: Any, device: torch.device, amp: torch.dtype | None, variant: dict[str, Any]) -> None:
        self.meta = self._build_arch(cfg).to(device)
        self.meta.autocast_dtype = amp
        for part in (self.meta.student.backbone, self.meta.teacher.backbone):
            if "attn_impl" in variant:
                part.set_attn_impl(variant["attn_impl"])
            if hasattr(part, "packed"):
                part.packed = variant.get("packed", part.packed)
        if variant.get("checkpointing"):
            self.meta.student.backbone.grad_checkpointing = True
        if variant.get("compile"):
            for part in (self.meta.student.backbone, self.meta.teacher.backbone):
                for blk in part.blocks:
                    blk.compile()
        groups = []
        for name, module in self.meta.student.items():
            groups += param_groups(module, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                                   name == "backbone")
        self.opt = build_optimizer(groups, (0.9, 0.999), device)
        for g in self.opt.param_groups:
            g["lr"], g["weight_decay"] = 1e-4 * g["lr_multiplier"], 0.04 * g["wd_multiplier"]
        backend = variant.get("sdpa_backend")
        self.kernel = (lambda: sdpa_kernel(getattr(SDPBackend, backend))) if backend else contextlib.nullcontext

    def _build_arch(self, cfg: Any) -> Any:
        return SSLMetaArch(cfg)

    def __call__(self, batch: dict[str, Any]) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.kernel():
            self.meta.forward_backward(batch, teacher_temp=0.07)
        self.meta.clip_gradients(3.0)
        self.opt.step()
        self.meta.update_teacher(0.994)


class BaselineStep:
    """The lightly + timm step (see ``lightly_baseline.py``)."""

    def __init__(self, cfg: Any, device: torch.device, amp: torch.dtype | None) -> None:
        self.model = LightlyDINOv2(
            cfg.student.arch, cfg.student.patch_size, cfg.crops.global_crops_size, cfg.dino.head_n_prototypes,
            cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim, cfg.student.drop_path_rate,
        ).to(device)
        self.amp = amp
        self.opt = self.model.build_optimizer()

    def __call__(self, batch: dict[str, Any]) -> None:
        self.model.step(batch, self.opt, amp_dtype=self.amp)


def count_flops(step: Any, batch: dict[str, Any]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return int(counter.get_total_flops())


def build_steps(args: argparse.Namespace, arch: str, device: torch.device,
                amp: torch.dtype | None) -> tuple[dict[str, Any], str | None]:
    """The baseline (unless ``--no-baseline`` or lightly is missing: then the reason) and our variants, each built
    directly on ``device`` from the same seed."""
    steps: dict[str, Any] = {}
    baseline_missing = "--no-baseline" if args.no_baseline else None
    if not args.no_baseline:
        try:
            import lightly  # noqa: F401
        except ImportError as err:
            baseline_missing = f"lightly is not installed ({err})"
    with torch.device(device):
        if baseline_missing is None:
            torch.manual_seed(0)
            steps["lightly+timm"] = BaselineStep(make_config(args, arch), device, amp)
        for name in args.variants:
            torch.manual_seed(0)
            variant_arch = f"timm/{arch}_patch16_224" if VARIANTS[name].get("timm") else arch
            steps[f"ours/{name}"] = OursStep(make_config(args, variant_arch), device, amp, VARIANTS[name])
    return steps, baseline_missing


def model_flops(steps: dict[str, Any], batch: dict[str, Any]) -> dict[str, int]:
    """FLOPs of one step per implementation, counted in eager mode. The ``compile`` and ``checkpointing`` variants do
    the default's model work (the counter cannot see into compiled code, and MFU counts recomputation as overhead,
    not work), so they get the default's count."""
    flops = {name: count_flops(step, batch) for name, step in steps.items()
             if name.split("/")[-1] not in ("compile", "checkpointing")}
    for name in steps:
        if name not in flops:
            flops[name] = flops["ours/default"]
    return flops


def bench_arch(args: argparse.Namespace, arch: str, device: torch.device, amp: torch.dtype | None,
               peak: float, deadline: float | None = None) -> list[dict[str, Any]]:
    """Baseline and every requested variant of our step for one architecture; rows of the result table."""
    batch = make_batch(args)
    steps, baseline_missing = build_steps(args, arch, device, amp)
    for name in [n for n in steps if VARIANTS.get(n.split("/")[-1], {}).get("sdpa_backend")]:
        try:  # a forced SDPA backend may have no kernel for these shapes, dtype or device: drop it, keep the rest
            steps[name](batch)
        except RuntimeError as err:
            print(f"{name}: not available here ({str(err).strip().splitlines()[0][:200]})", flush=True)
            del steps[name]
    t0 = time.perf_counter()
    flops = model_flops(steps, batch)
    one_round = time.perf_counter() - t0  # about one step of each: kept back for the peak-memory pass
    times = time_alternating({n: (lambda s=s: s(batch)) for n, s in steps.items()}, args.repeats, device,
                             warmup=args.warmup, deadline=None if deadline is None else deadline - one_round)
    if args.profile:
        profile_steps(args, arch, steps, batch, device)
    mem = {}
    for name, step in steps.items():
        gc.collect()
        with PeakMemory(device) as pm:
            step(batch)
        mem[name] = pm.peak
    n_images = args.batch  # images per step (each with 2 + n local crops)
    base_t = median(times["lightly+timm"]) if "lightly+timm" in times else None
    attn = resolve_attn_impl("auto", torch.empty(0, device=device))
    rows = []
    for name in steps:
        t = median(times[name])
        rows.append({
            "arch": arch, "impl": name, "step_s": t, "img_per_s": n_images / t,
            "speedup": base_t / t if base_t else None, "gflop_per_step": flops[name] / 1e9,
            "tflops": flops[name] / t / 1e12, "mfu": flops[name] / t / peak, "peak_mem_gib": mem[name] / 2**30,
            "times_s": times[name], "auto_attention": attn, "baseline_missing": baseline_missing,
        })
    del steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_steps(args: argparse.Namespace, arch: str, steps: dict[str, Any], batch: dict[str, Any],
                  device: torch.device) -> None:
    """``--profile N``: N steps of every implementation under ``torch.profiler``; the top operations by self CPU
    time and (on CUDA) by self device time, and the kernel launches per step, go to
    ``profile_<arch>_<impl>.txt`` beside the JSON, so a check's output explains where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    out_dir = Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / "results"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, step in steps.items():
        step(batch)  # warm: plans and caches are made outside the trace
        with profile(activities=activities) as prof:
            for _ in range(args.profile):
                step(batch)
            sync(device)
        table = prof.key_averages()
        lines = [f"{arch} {name}: {args.profile} steps, batch {args.batch}, device {device}"]
        if device.type == "cuda":
            launches = sum(e.count for e in table if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                "cudaLaunchKernelExC", "cuLaunchKernelEx"))
            syncs = sum(e.count for e in table if "Synchronize" in e.key)
            lines.append(f"kernel launches per step: {launches / args.profile:.0f}; synchronisations per step: "
                         f"{syncs / args.profile:.1f}")
            lines.append(table.table(sort_by="self_cuda_time_total", row_limit=25))
        lines.append(table.table(sort_by="self_cpu_time_total", row_limit=25))
        path = out_dir / f"profile_{arch}_{name.replace('/', '_').replace('+', '_')}.txt"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["vit_small", "vit_base"], help="backbones to benchmark")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536, help="DINO/iBOT head prototypes (recipe: 65536)")
    p.add_argument("--drop-path", type=float, default=0.1,
                   help="uniform stochastic-depth rate of the student, both sides (lightly's DINOv2 example: 0.1; "
                        "DINOv2 recipe default: 0.3; ViT-L/g configs: 0.4)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS),
                   help="variants of our step to time next to the baseline")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--no-baseline", action="store_true", help="time our variants only (no lightly + timm step)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also trace N steps of each implementation with torch.profiler (profile_*.txt)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time box of the whole run: the timed rounds stop early (after at least one) to end in it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    if "compile" in args.variants and "default" not in args.variants:
        args.variants = ["default", *args.variants]  # the compiled step's FLOPs are the default's (model_flops)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (32 if device.type == "cuda" else 4)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp = torch.bfloat16 if precision == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # best of 20 on a GPU: the first products run while its clocks ramp up
    peak = matmul_peak_flops(device, torch.bfloat16 if amp else torch.float32,
                             repeats=20 if device.type == "cuda" else 5)
    print(f"device {device}, {precision}, measured matmul peak {peak / 1e9:.1f} GFLOP/s, batch {args.batch} x "
          f"(2 x {args.global_size}px + {args.local_crops} x {args.local_size}px)", flush=True)
    rows = []
    for arch in args.arch:
        rows += bench_arch(args, arch, device, amp, peak, deadline)
    print_table(rows, ["arch", "impl", "step_s", "img_per_s", "speedup", "gflop_per_step", "mfu", "peak_mem_gib"])
    name = f"train_step_{device.type}" + (f"_{args.tag}" if args.tag else "")
    write_json(name, {"args": vars(args), "precision": precision, "matmul_peak_flops": peak, "rows": rows},
               args.out_dir)
    return rows


if __name__ == "__main__":
    main()
