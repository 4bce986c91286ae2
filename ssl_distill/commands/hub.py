"""``ssl-distill models`` (zoo list), ``download`` and ``convert`` (ssl_distill.hub)."""

from __future__ import annotations

import argparse
import json

from ssl_distill.commands import UserError
from ssl_distill.hub import HubError, convert_file, download, registry, sha256_file


def run_models(args: argparse.Namespace) -> int:
    """Print the zoo (a table, or JSON with URLs and sha256)."""
    if args.json:
        rows = [{"name": e.name, "arch": e.arch, "arch_kwargs": dict(e.arch_kwargs), "params": e.params,
                 "knn_top1": e.knn_top1, "linear_top1": e.linear_top1, "license": e.license,
                 "url": e.url() if e.path else None, "sha256": e.sha256, "timm_name": e.timm_name}
                for e in registry.MODELS.values()]
        print(json.dumps(rows, indent=2))
    else:
        print(registry.format_table())
        print("\nImageNet-1k top-1 (%) of frozen features as published (facebookresearch/dinov2). "
              "Load with ssl_distill.hub.load(NAME); fetch with `ssl-distill download NAME`.")
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
