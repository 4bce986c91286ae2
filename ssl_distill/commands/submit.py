"""``ssl-distill submit``: check the job's arguments here, then hand it to Slurm (ssl_distill.launch.slurm).

The registry imports the launcher, never the reverse: the job's tasks run commands through :func:`run_command`,
which is handed to the launcher here (docs/ARCHITECTURE.md, "Floors").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_distill.commands import UserError, parse_command, run_command
from ssl_distill.config import load_config
from ssl_distill.launch import slurm
from ssl_distill.launch.common import SubmitError, with_output_dir


def validate_submitted(command: str, command_args: list[str]) -> None:
    """Catch mistakes in the pass-through arguments now rather than after the job waited in the queue."""
    sub = parse_command(command, command_args)  # argparse errors exit here with usage
    if command == "train":
        cfg = load_config(sub.config_file, sub.opts)
        if not cfg.train.dataset_path:
            raise UserError("train.dataset_path is empty: add train.dataset_path=/path/to/images after `train`.")
        paths = {"train.dataset_path": cfg.train.dataset_path}
        weights = {"student.pretrained_weights": cfg.student.pretrained_weights}
    else:
        paths = {"--train-dataset": sub.train_dataset, "--val-dataset": sub.val_dataset}
        weights = {"--pretrained-weights": sub.pretrained_weights}
    for name, path in paths.items():
        if not Path(path).exists():
            raise UserError(f"{name} {path} does not exist (paths are read by the job on the compute nodes).")
    for name, spec in weights.items():
        _check_weights(name, spec)


def _check_weights(name: str, spec: str) -> None:
    """A weights argument the job could not use: a missing file or an unknown zoo name (URLs are not fetched here;
    ``random`` and empty are fine)."""
    from ssl_distill.hub.registry import HubError, get_model
    from ssl_distill.hub.resolve import RANDOM_WEIGHTS, looks_like_a_path

    if not spec or spec == RANDOM_WEIGHTS or spec.startswith(("http://", "https://")):
        return
    if looks_like_a_path(spec):
        path = Path(spec[len("file://"):] if spec.startswith("file://") else spec).expanduser()
        if not path.is_file():
            raise UserError(f"{name} {spec} is not a file (paths are read by the job on the compute nodes); pass a "
                            "checkpoint or weights file, a model-zoo name (`ssl-distill models`) or 'random'.")
        return
    try:
        get_model(spec)
    except HubError as err:
        raise UserError(f"{name}: {err}") from None


def run_submit(args: argparse.Namespace) -> int:
    """Submit ``args.command`` with its arguments into ``--output-dir`` and print how to follow it."""
    try:
        slurm.check_slurm_available()
        command_args = with_output_dir(args.command_args, args.output_dir)
        validate_submitted(args.command, command_args)
        job = slurm.submit(args, command_args, run_command)
    except SubmitError as exc:
        raise UserError(str(exc)) from None
    print(slurm.describe_submission(job, args))
    return 0
