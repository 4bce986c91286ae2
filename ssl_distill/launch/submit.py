"""``ssl-distill submit``: check the job's arguments here, then hand it to Slurm (ssl_distill.launch.slurm)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_distill.commands import UserError, parse_command
from ssl_distill.config import load_config
from ssl_distill.launch import slurm


def validate_submitted(command: str, command_args: list[str]) -> None:
    """Catch mistakes in the pass-through arguments now rather than after the job waited in the queue."""
    sub = parse_command(command, command_args)  # argparse errors exit here with usage
    if command == "train":
        dataset = load_config(sub.config_file, sub.opts).train.dataset_path
        if not dataset:
            raise UserError("train.dataset_path is empty: add train.dataset_path=/path/to/images after `train`.")
        paths = {"train.dataset_path": dataset}
    else:
        paths = {"--train-dataset": sub.train_dataset, "--val-dataset": sub.val_dataset}
    for name, path in paths.items():
        if not Path(path).exists():
            raise UserError(f"{name} {path} does not exist (paths are read by the job on the compute nodes).")


def run_submit(args: argparse.Namespace) -> int:
    """Submit ``args.command`` with its arguments into ``--output-dir`` and print how to follow it."""
    try:
        slurm.check_slurm_available()
        command_args = slurm.with_output_dir(args.command_args, args.output_dir)
        validate_submitted(args.command, command_args)
        job = slurm.submit(args, command_args)
    except slurm.SubmitError as exc:
        raise UserError(str(exc)) from None
    print(slurm.describe_submission(job, args))
    return 0
