"""``ssl-distill models`` (zoo list, ``--flops`` table), ``download`` and ``convert`` (ssl_distill.hub)."""

from __future__ import annotations

import argparse
import json

from ssl_distill.commands import UserError
from ssl_distill.hub import HubError, convert_file, download, registry, sha256_file
from ssl_distill.models import build_backbone


def run_models(args: argparse.Namespace) -> int:
    """Print the zoo (a table, or JSON with URLs and sha256), or with ``--flops`` the models' FLOP tables."""
    if args.flops:
        return _print_flops(args.flops, args.image_size, args.depth)
    if args.json:
        rows = [{"name": e.name, "arch": e.arch, "arch_kwargs": dict(e.arch_kwargs), "params": e.params,
                 "knn_top1": e.knn_top1, "linear_top1": e.linear_top1, "license": e.license,
                 "url": e.url() if e.path else None, "sha256": e.sha256, "timm_name": e.timm_name}
                for e in registry.MODELS.values()]
        print(json.dumps(rows, indent=2))
    else:
        print(registry.format_table())
        print("\nImageNet-1k top-1 (%) of frozen features as published (facebookresearch/dinov2). "
              "Load with ssl_distill.hub.load(NAME); fetch with `ssl-distill download NAME`. "
              "FLOPs per module: `ssl-distill models --flops NAME`.")
    return 0


def _print_flops(names: list[str], image_size: int, depth: int) -> int:
    """fvcore's per-module table of each zoo backbone (random weights) for one ``image_size`` image."""
    from ssl_distill.models.flops import flop_table

    if depth < 0:
        raise UserError(f"--depth must be >= 0, got {depth}.")
    try:
        entries = [registry.get_model(name) for name in names]
    except HubError as exc:
        raise UserError(str(exc)) from None
    for entry in entries:
        patch = int(entry.arch_kwargs.get("patch_size", 16))
        if image_size < patch or image_size % patch:
            lower, upper = image_size // patch * patch, (image_size // patch + 1) * patch
            raise UserError(f"--image-size {image_size} is not a multiple of {entry.name}'s patch size {patch}; use "
                            f"{lower or upper} or {upper}.")
        table, total = flop_table(build_backbone(entry.arch, **entry.build_kwargs()), image_size, depth)
        print(f"{entry.name} at {image_size}x{image_size} px, one image: {total / 1e9:.2f} GFLOP "
              "(fvcore: one multiply-add = one FLOP)\n")
        print(table + "\n")
    return 0


def run_download(args: argparse.Namespace) -> int:
    """Download zoo weights (verified, resumable) and print where they are."""
    try:
        for name in args.names:
            path = download(name, args.dest, progress=False if args.quiet else None)
            print(f"{name}: {path}" + (f"  sha256={sha256_file(path)}" if args.sha256 else ""))
    except HubError as exc:
        raise UserError(str(exc)) from None
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Convert a weights file between the DINOv2, timm and Hugging Face layouts."""
    try:
        written, note = convert_file(args.input, args.output, args.src, args.dst, args.hf_keys, args.num_heads)
    except HubError as exc:
        raise UserError(str(exc)) from None
    spelling = f" ({args.hf_keys} key names)" if args.dst == "hf" else ""
    print(f"wrote {args.dst} layout{spelling} to {', '.join(map(str, written))}")
    if args.dst == "hf" and all(p.name != "config.json" for p in written):
        print("hint: for Dinov2Model.from_pretrained give a directory as OUT; it gets model.safetensors + config.json")
    if note:
        print(note)
    return 0
