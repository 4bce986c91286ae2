"""``ssl-distill eval-knn`` / ``eval-linear`` (ssl_distill.eval.run) and ``visualize`` (ssl_distill.viz)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ssl_distill.commands import UserError
from ssl_distill.data import BrokenImageError
from ssl_distill.distributed import resolve_device
from ssl_distill.eval import run
from ssl_distill.eval.data import EvalInputError
from ssl_distill.hub import HubError, resolve_backbone
from ssl_distill.viz.attention import collect_image_paths, visualize_images


def _evaluation(run_eval: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run an evaluation; dataset, weights and image mistakes become one line."""
    try:
        return run_eval(args)
    except (EvalInputError, BrokenImageError) as exc:
        raise UserError(str(exc)) from None


def run_knn(args: argparse.Namespace) -> int:
    """Weighted k-NN of a frozen backbone (:func:`ssl_distill.eval.run.run_knn`)."""
    return _evaluation(run.run_knn, args)


def run_linear(args: argparse.Namespace) -> int:
    """Linear probes of a frozen backbone (:func:`ssl_distill.eval.run.run_linear`)."""
    return _evaluation(run.run_linear, args)


def run_visualize(args: argparse.Namespace) -> int:
    """CLS-attention maps of the last block, one PNG per image."""
    if args.image_size < 1 or not 0.0 <= args.threshold <= 1.0:
        raise UserError("--image-size must be >= 1 and --threshold in [0, 1] (0 = no masks).")
    try:
        device = resolve_device(args.device, what="--device")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        paths = collect_image_paths(args.images)
        model, _ = resolve_backbone(args.pretrained_weights, args.config_file, args.opts)
        if args.image_size < model.patch_size:
            raise UserError(f"--image-size {args.image_size} is smaller than the patch size {model.patch_size}.")
        written = visualize_images(model, paths, args.output_dir, args.image_size, args.threshold or None, device)
    except (FileNotFoundError, BrokenImageError, HubError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {len(written)} attention figure(s) to {args.output_dir}")
    return 0
