"""``ssl-distill <command>``: the one entry point. Each command's help doubles as advice.

Commands import their heavy modules lazily so ``ssl-distill --help`` stays instant.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ssl_distill.config import ConfigError

logger = logging.getLogger("ssl_distill")


class UserError(Exception):
    """A mistake the user can fix; printed as one line without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", default=None, help="experiment YAML overriding the typed defaults (configs/*.yaml)")
    p.add_argument(
        "opts", nargs="*", default=[], metavar="key=value",
        help="dotlist overrides applied last, e.g. optim.epochs=10 train.batch_size_per_gpu=32",
    )


def _setup_run_logging(output_dir: str, verbose: bool) -> None:
    """Rank 0 logs to the console; every rank logs to ``output_dir/logs/rank{r}.log``."""
    from pathlib import Path

    from ssl_distill import distributed

    rank = distributed.detect_environment().rank
    root = logging.getLogger()
    if rank != 0:
        for handler in list(root.handlers):
            root.removeHandler(handler)
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def cmd_train(args: argparse.Namespace) -> int:
    from ssl_distill.config import load_config
    from ssl_distill.train.signals import StopOnSignals

    cfg = load_config(args.config_file, args.opts)
    if not cfg.train.dataset_path:
        raise UserError("train.dataset_path is empty: add train.dataset_path=/path/to/images (folder or list file).")
    _setup_run_logging(args.output_dir, args.verbose)
    stop = StopOnSignals((signal.SIGINT, signal.SIGTERM))
    try:
        return _train(cfg, args, stop)
    finally:
        stop.restore()


def _train(cfg: Any, args: argparse.Namespace, stop: Any) -> int:
    """Build and run the trainer; user mistakes and stops become one line and an exit status."""
    from ssl_distill.data import BrokenImageError, DatasetError
    from ssl_distill.train.checkpoint import CheckpointError, find_latest_checkpoint
    from ssl_distill.train.run_lock import RunLockedError
    from ssl_distill.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

    try:
        trainer = Trainer(cfg, args.output_dir, resume=not args.no_resume)
        stop.attach(trainer)
        if getattr(args, "on_trainer", None) is not None:
            args.on_trainer(trainer)  # the Slurm launcher installs its stop-on-preemption hook here
        summary = trainer.run()
    except (FileNotFoundError, BrokenImageError, DatasetError, CheckpointError, RunLockedError) as exc:
        raise UserError(str(exc)) from None
    except TrainingDiverged as exc:
        print(f"ssl-distill train: training diverged: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        if exc.reason and exc.reason != stop.signal_name:
            raise  # asked for by someone else first (Slurm's preemption signal): its launcher requeues
        by = stop.signal_name or "a signal to another rank"
        print(f"ssl-distill train: stopped by {by} at iteration {exc.iteration}; saved {exc.checkpoint}. Run the "
              "same command again to resume from it.", file=sys.stderr)
        return 128 + (stop.received or signal.SIGTERM)
    except KeyboardInterrupt:
        latest = find_latest_checkpoint(args.output_dir)
        print("ssl-distill train: interrupted; exited at once without saving the current iteration. "
              + (f"Run the same command again to resume from {latest}." if latest else "No checkpoint was written."),
              file=sys.stderr)
        return 128 + signal.SIGINT
    logger.info("done: %s", summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_distill.train.checkpoint import export_backbone

    try:
        path = export_backbone(args.checkpoint, args.output, which=args.which)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {args.which} backbone (official DINOv2 key layout) to {path}")
    return 0


def _run_eval(args: argparse.Namespace, which: str) -> int:
    """Run ``eval-knn`` / ``eval-linear``; user mistakes (datasets, weights, broken images) become one line."""
    from ssl_distill.data import BrokenImageError
    from ssl_distill.eval import commands
    from ssl_distill.eval.data import EvalInputError

    run = commands.run_knn_command if which == "knn" else commands.run_linear_command
    try:
        return run(args)
    except (EvalInputError, BrokenImageError) as exc:
        raise UserError(str(exc)) from None


def cmd_eval_knn(args: argparse.Namespace) -> int:
    return _run_eval(args, "knn")


def cmd_eval_linear(args: argparse.Namespace) -> int:
    return _run_eval(args, "linear")


def cmd_models(args: argparse.Namespace) -> int:
    from ssl_distill.hub import registry

    if args.json:
        import json

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


def cmd_download(args: argparse.Namespace) -> int:
    from ssl_distill.hub import HubError, download, sha256_file

    try:
        for name in args.names:
            path = download(name, args.dest, progress=False if args.quiet else None)
            print(f"{name}: {path}" + (f"  sha256={sha256_file(path)}" if args.sha256 else ""))
    except HubError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ssl_distill.hub import HubError, convert_file

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


def _add_hub_commands(sub: argparse._SubParsersAction) -> None:
    """``models``, ``download`` and ``convert`` (model zoo, ssl_distill.hub)."""
    models = sub.add_parser("models", help="list the model zoo (architecture, params, published accuracy, licence)")
    models.add_argument("--json", action="store_true", help="machine-readable output with URLs and sha256")
    models.set_defaults(func=cmd_models)

    dl = sub.add_parser(
        "download", help="download zoo weights into the cache (resumable, verified)",
        description="Downloads into $SSL_DISTILL_HOME/checkpoints (default ~/.cache/ssl_distill/checkpoints). "
        "Interrupted downloads resume. SSL_DISTILL_BASE_URL points the zoo at a mirror; SSL_DISTILL_OFFLINE=1 "
        "never touches the network.",
    )
    dl.add_argument("names", nargs="+", metavar="NAME", help="model names (see `ssl-distill models`)")
    dl.add_argument("--dest", default=None, help="directory to download into instead of the cache")
    dl.add_argument("--sha256", action="store_true", help="print each file's sha256 (for registering checkpoints)")
    dl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=cmd_download)

    conv = sub.add_parser(
        "convert", help="convert backbone weights between DINOv2 (ssl_distill), timm and Hugging Face layouts",
        description="Reads .pth/.safetensors (or one of our training checkpoints: its teacher backbone) and writes "
        "the requested layout atomically; OUT ending in .safetensors writes safetensors. Hugging Face input may use "
        "either key spelling (save_pretrained files or a transformers 5 model.state_dict()); it is detected.",
    )
    conv.add_argument("--from", dest="src", default="auto", choices=("auto", "dinov2", "ssl_distill", "timm", "hf"),
                      help="layout of IN (default: detect)")
    conv.add_argument("--to", dest="dst", default="ssl_distill", choices=("ssl_distill", "dinov2", "timm", "hf"),
                      help="layout of OUT (ssl_distill = official DINOv2 layout)")
    conv.add_argument("--hf-keys", default="disk", choices=("disk", "memory"),
                      help="with --to hf: 'disk' = the names save_pretrained writes and from_pretrained reads "
                      "(transformers 4 and 5 files); 'memory' = transformers 5 model.state_dict() names, for "
                      "load_state_dict(strict=True) into a live model (default: disk)")
    conv.add_argument("--num-heads", type=int, default=None,
                      help="with --to hf: attention heads written to config.json (default: width / 64, as in "
                      "every DINOv2 model)")
    conv.add_argument("input", metavar="IN", help="input weights file")
    conv.add_argument("output", metavar="OUT",
                      help="output weights file; with --to hf a directory (no .pth/.safetensors suffix) gets "
                      "model.safetensors + config.json, ready for Dinov2Model.from_pretrained(OUT)")
    conv.set_defaults(func=cmd_convert)


def cmd_visualize(args: argparse.Namespace) -> int:
    from ssl_distill.data import BrokenImageError
    from ssl_distill.distributed import resolve_device
    from ssl_distill.hub import HubError, resolve_backbone
    from ssl_distill.viz.attention import collect_image_paths, visualize_images

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


def _add_visualize_command(sub: argparse._SubParsersAction) -> None:
    """``visualize``: CLS-attention maps of the last block to PNG (ssl_distill.viz)."""
    viz = sub.add_parser(
        "visualize", help="save the last block's CLS-attention maps (per head + mean) as PNGs, as in DINO",
        description="Writes OUTPUT_DIR/<image stem>_attention.png per image: the input, one heat map per head, the "
        "head mean and (with --threshold) the patches holding that fraction of each map's attention mass.",
    )
    viz.add_argument("--pretrained-weights", required=True,
                     help="a training checkpoint (teacher backbone), an exported backbone / official DINOv2 state "
                          "dict (architecture from --config-file and key=value overrides), a model-zoo name, or "
                          "'random'")
    viz.add_argument("--images", nargs="+", required=True, metavar="IMG",
                     help="image files and/or folders of images (not recursive)")
    viz.add_argument("--output-dir", required=True, help="where the PNGs are written")
    viz.add_argument("--image-size", type=int, default=480,
                     help="resize the shorter side to this (aspect kept), then crop to multiples of the patch size; "
                          "larger sizes give finer maps")
    viz.add_argument("--threshold", type=float, default=0.6,
                     help="also show the fewest patches holding this fraction of each map's attention mass "
                          "(DINO's masks; 0 = off)")
    viz.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    _add_config_args(viz)
    viz.set_defaults(func=cmd_visualize)


def _validate_submitted(command: str, command_args: list[str]) -> None:
    """Catch mistakes in the pass-through arguments now rather than after the job waited in the queue."""
    from pathlib import Path

    sub = _build_parser().parse_args([command, *command_args])  # argparse errors exit here with usage
    if command == "train":
        from ssl_distill.config import load_config

        dataset = load_config(sub.config_file, sub.opts).train.dataset_path
        if not dataset:
            raise UserError("train.dataset_path is empty: add train.dataset_path=/path/to/images after `train`.")
        paths = {"train.dataset_path": dataset}
    else:
        paths = {"--train-dataset": sub.train_dataset, "--val-dataset": sub.val_dataset}
    for name, path in paths.items():
        if not Path(path).exists():
            raise UserError(f"{name} {path} does not exist (paths are read by the job on the compute nodes).")


def cmd_submit(args: argparse.Namespace) -> int:
    from ssl_distill.launch import slurm

    try:
        slurm.check_slurm_available()
        command_args = slurm.with_output_dir(args.command_args, args.output_dir)
        _validate_submitted(args.command, command_args)
        job = slurm.submit(args, command_args)
    except slurm.SubmitError as exc:
        raise UserError(str(exc)) from None
    print(slurm.describe_submission(job, args))
    return 0


def _add_submit_command(sub: argparse._SubParsersAction) -> None:
    from ssl_distill.launch.args import SUBMIT_DESCRIPTION, SUBMIT_EPILOG, add_submit_args  # argparse only

    submit = sub.add_parser(
        "submit", help="run train / eval-knn / eval-linear on Slurm (submitit; requeues on preemption)",
        description=SUBMIT_DESCRIPTION, epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_submit_args(submit)
    submit.set_defaults(func=cmd_submit, cli_command="submit")


def cmd_demo(args: argparse.Namespace) -> int:
    from ssl_distill.demo import run_demo

    return run_demo(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-distill",
        description="Self-supervised ViT pretraining (DINOv2 / iBOT recipe): train, evaluate, use the model zoo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    train = sub.add_parser(
        "train", help="pretrain a ViT (resumes automatically from the latest checkpoint in --output-dir)",
        description="Pretrain with the DINOv2 recipe. Launch with torchrun for several processes; "
        "`ssl-distill submit ... train` for Slurm.",
    )
    _add_config_args(train)
    train.add_argument("--output-dir", required=True, help="checkpoints, metrics, config.yaml and logs go here")
    train.add_argument("--no-resume", action="store_true", help="start over even if --output-dir has checkpoints")
    train.set_defaults(func=cmd_train)
    _add_submit_command(sub)

    export = sub.add_parser("export", help="write a checkpoint's teacher backbone as an official-layout state dict")
    export.add_argument("--checkpoint", required=True, help="a training checkpoint (model_XXXXXXX.pth)")
    export.add_argument("--output", required=True, help="output .pth file")
    export.add_argument("--which", choices=("teacher", "student"), default="teacher", help="which backbone")
    export.set_defaults(func=cmd_export)

    from ssl_distill.eval.commands import add_knn_args, add_linear_args  # argparse only, no torch

    knn = sub.add_parser(
        "eval-knn", help="weighted k-NN accuracy of a frozen backbone on a labelled image folder",
        description="L2-normalised CLS features, cosine similarity, votes weighted by exp(sim / T); "
        "writes OUTPUT_DIR/results_eval_knn.json.",
    )
    add_knn_args(knn)
    _add_config_args(knn)
    knn.set_defaults(func=cmd_eval_knn)

    linear = sub.add_parser(
        "eval-linear", help="linear-probe accuracy of a frozen backbone (a grid of heads, best on val)",
        description="Trains lr x last-1/4-blocks x avgpool linear heads from one backbone forward; writes "
        "OUTPUT_DIR/results_eval_linear.json and OUTPUT_DIR/best_linear_head.pth.",
    )
    add_linear_args(linear)
    _add_config_args(linear)
    linear.set_defaults(func=cmd_eval_linear)

    _add_hub_commands(sub)
    _add_visualize_command(sub)

    demo = sub.add_parser("demo", help="run the built-in demo on bundled data and print the result")
    _add_config_args(demo)
    demo.add_argument("--output-dir", default="demo_output", help="where the demo writes its outputs")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, on_trainer: Callable[[Any], None] | None = None) -> int:
    """Run one command; returns the exit status. ``on_trainer`` is called with the Trainer before ``train`` runs."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.on_trainer = on_trainer
    args.cli_command = getattr(args, "cli_command", None) or args.command  # `submit` keeps the job's in .command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"ssl-distill {args.cli_command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _USER_FILE_ERRNOS or args.verbose:
            raise  # a bug, or asked for the details (-v): the traceback
        print(f"ssl-distill {args.cli_command}: error: {describe_file_error(exc)}", file=sys.stderr)
        return 2


_USER_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                     errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def describe_file_error(exc: OSError) -> str:
    """One line for a file-system error a user can fix: what, where, and what to do."""
    where = f" '{exc.filename}'" if exc.filename else ""
    advice = {
        errno.EACCES: "check the permissions of that path or choose one you can write to (e.g. another --output-dir)",
        errno.EPERM: "check the permissions of that path or choose one you can write to (e.g. another --output-dir)",
        errno.EROFS: "that file system is read-only; choose a writable location (e.g. another --output-dir)",
        errno.ENOSPC: "the disk is full; free space or choose another location (finished files were kept)",
        errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
        errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
        errno.EISDIR: "that path is a directory where a file was expected; give a file path",
    }.get(exc.errno, "check the path")
    return f"{exc.strerror or exc}:{where}; {advice}."


if __name__ == "__main__":
    sys.exit(main())
