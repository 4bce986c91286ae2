"""``ssl-distill train`` and ``ssl-distill export``: run (or resume) a pretraining run; export its backbone."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from ssl_distill import distributed
from ssl_distill.commands import UserError
from ssl_distill.config import load_config
from ssl_distill.data import BrokenImageError, DatasetError
from ssl_distill.train.checkpoint import CheckpointError, export_backbone, find_latest_checkpoint
from ssl_distill.train.loader_watch import LoaderFailed
from ssl_distill.train.memory import is_out_of_memory, out_of_memory_line
from ssl_distill.train.run_lock import RunLockedError
from ssl_distill.train.signals import StopOnSignals
from ssl_distill.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

logger = logging.getLogger("ssl_distill")


def setup_run_logging(output_dir: str, verbose: bool) -> None:
    """Rank 0 logs to the console; every rank logs to ``output_dir/logs/rank{r}.log``."""
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


def run_train(args: argparse.Namespace) -> int:
    """Pretrain (resuming from ``--output-dir``) until the end, a stop signal or a divergence."""
    cfg = load_config(args.config_file, args.opts)
    if not cfg.train.dataset_path:
        raise UserError("train.dataset_path is empty: add train.dataset_path=/path/to/images (folder or list file).")
    setup_run_logging(args.output_dir, args.verbose)
    stop = StopOnSignals((signal.SIGINT, signal.SIGTERM))
    try:
        return _train(cfg, args, stop)
    finally:
        stop.restore()


def _train(cfg: DictConfig, args: argparse.Namespace, stop: StopOnSignals) -> int:
    """Build and run the trainer; user mistakes and stops become one line and an exit status."""
    try:
        trainer = Trainer(cfg, args.output_dir, resume=not args.no_resume)
        stop.attach(trainer)
        if getattr(args, "on_trainer", None) is not None:
            args.on_trainer(trainer)  # the Slurm job installs its stop-on-preemption hook here
        summary = trainer.run()
    except (FileNotFoundError, BrokenImageError, DatasetError, CheckpointError, RunLockedError) as exc:
        raise UserError(str(exc)) from None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        latest = find_latest_checkpoint(args.output_dir)
        kept = f" The last checkpoint, {latest}, is intact." if latest else ""
        raise UserError(out_of_memory_line(exc, cfg) + kept) from None
    except TrainingDiverged as exc:
        print(f"ssl-distill train: training diverged: {exc}", file=sys.stderr)
        return 1
    except LoaderFailed as exc:
        print(f"ssl-distill train: stopped: {exc.detail} at iteration {exc.iteration}; saved {exc.checkpoint}. Run "
              "the same command again to resume from it.", file=sys.stderr)
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


def run_export(args: argparse.Namespace) -> int:
    """Write a checkpoint's teacher (or student) backbone as an official-layout state dict."""
    try:
        path = export_backbone(args.checkpoint, args.output, which=args.which)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {args.which} backbone (official DINOv2 key layout) to {path}")
    return 0
